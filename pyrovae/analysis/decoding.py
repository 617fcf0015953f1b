"""Decoding sentences from a sentence model: greedy, sampled and beam-search decoding,
reconstructions, sentences from the prior, homotopies (Bowman et al. 2016), and a
text file of them all.

A model decodes if it has the interface of :class:`pyrovae.models.sentence.SentenceDecoderModel`:

    context = model.decoder_context(z, y)                  # conditioning vector, or None
    state = model.start_decoding(context, rows)
    logits, state = model.next_token_logits(tokens, state)  # (rows,) word ids -> (rows, V)
    state = model.select_states(state, index)              # keep/reorder rows (beam search)
    model.latent_sites, model.latent_size                   # its latent site, and D of z (0: none)
    model.conditions_on_label                              # whether y goes into the context

Every decoder starts each row from ``<bos>``, emits at most ``max_length`` words (``<eos>``
included) and returns each sentence as a list of word ids up to, not including, its ``<eos>``.
``<pad>`` and ``<bos>`` are never emitted: no sentence holds them, so they are never targets.
A model without a latent (the language model) decodes with ``z = None``: one row, or one per
label of ``y``; a ``(N, 0)`` tensor asks for N rows.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping

import torch
from pyro import poutine
from torch.nn import functional as F

from pyrovae.analysis.plots import evaluation_mode
from pyrovae.data.text import BOS, EOS, PAD, UNK
from pyrovae.nn import real_positions
from pyrovae.files import write_text_atomically


@contextlib.contextmanager
def _evaluating(*parts):
    """Evaluation mode (no dropout, no word dropout) and no gradients, restoring the modes after."""
    with evaluation_mode(*parts), torch.no_grad():
        yield


def _device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _rows(z: torch.Tensor | None, y: torch.Tensor | None) -> int:
    if z is not None:
        if y is not None and y.shape[0] != z.shape[0]:
            raise ValueError(f"z has {z.shape[0]} rows but y has {y.shape[0]}: give one label per row")
        return int(z.shape[0])
    return 1 if y is None else int(y.shape[0])


def _max_length(model, max_length: int | None) -> int:
    if max_length is None:
        max_length = model.data.max_length or model.data.x_shape[0]
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length = {max_length!r} is not allowed: it must be an integer >= 1")
    return max_length


def _never_emitted(logits: torch.Tensor) -> torch.Tensor:
    """Logits with <pad> and <bos> ruled out (-inf), the others unchanged."""
    return logits.index_fill(-1, torch.tensor([PAD, BOS], device=logits.device), -math.inf)


def _on_model(model, z, y):
    """z and y on the model's device, and their number of rows."""
    device, _ = _device_and_dtype(model)
    z = None if z is None else z.to(device)
    y = None if y is None else y.to(device)
    return z, y, _rows(z, y)


def _until_eos(words: torch.Tensor | list[list[int]]) -> list[list[int]]:
    """Each row of ids up to its first <eos>, which is left out."""
    rows = words.tolist() if torch.is_tensor(words) else words
    return [row[: row.index(EOS)] if EOS in row else list(row) for row in rows]


def _autoregressive(model, z, max_length, y, choose: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
    """Feed each row its own previous word, ``choose(logits)`` picking the next, until every row
    has emitted <eos> or ``max_length`` words."""
    with _evaluating(model):
        z, y, rows = _on_model(model, z, y)
        state = model.start_decoding(model.decoder_context(z, y), rows)
        device, _ = _device_and_dtype(model)
        tokens = torch.full((rows,), BOS, dtype=torch.int64, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        emitted = []
        for _ in range(_max_length(model, max_length)):
            logits, state = model.next_token_logits(tokens, state)
            tokens = choose(_never_emitted(logits))
            emitted.append(tokens)
            finished = finished | (tokens == EOS)
            if bool(finished.all()):
                break
        return _until_eos(torch.stack(emitted, 1))


def greedy_decode(model, z: torch.Tensor | None, max_length: int | None = None, y: torch.Tensor | None = None) -> list[list[int]]:
    """w_t = argmax_w p(w | w_<t, z, y) for each row of z (N, D)."""
    return _autoregressive(model, z, max_length, y, lambda logits: logits.argmax(-1))


def sample_decode(
    model,
    z: torch.Tensor | None,
    max_length: int | None = None,
    y: torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """w_t ~ softmax(logits_t / temperature) for each row of z: temperature 1 samples the
    model's own p(w | w_<t, z, y), lower ones sharpen it towards greedy decoding."""
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature!r} is not allowed: it must be > 0")

    def draw(logits):
        return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(-1)

    return _autoregressive(model, z, max_length, y, draw)


def beam_search(
    model,
    z: torch.Tensor | None,
    max_length: int | None = None,
    y: torch.Tensor | None = None,
    beam_size: int = 5,
    normalize_length: bool = False,
) -> list[list[int]]:
    """The most probable sentence of each row that a beam of ``beam_size`` hypotheses finds:

        score(w_1..w_L) = sum_t log p(w_t | w_<t, z, y),   divided by L if ``normalize_length``

    (L counts the <eos>). A hypothesis that emits <eos> stays in the beam with its score frozen;
    the search ends when every hypothesis has ended or after ``max_length`` words. With
    normalization, hypotheses of different lengths are ranked by their per-word score. Beam size
    1 is greedy decoding.
    """
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size = {beam_size!r} is not allowed: it must be an integer >= 1")
    width = beam_size
    with _evaluating(model):
        device, dtype = _device_and_dtype(model)
        z, y, rows = _on_model(model, z, y)
        # Each row's beam occupies ``width`` consecutive decoder rows.
        z, y = (None if part is None else part.repeat_interleave(width, 0) for part in (z, y))
        state = model.start_decoding(model.decoder_context(z, y), rows * width)
        # Only the first hypothesis of each beam is live at the start, so its copies are not kept twice.
        scores = torch.full((rows, width), -math.inf, dtype=dtype, device=device)
        scores[:, 0] = 0.0
        lengths = torch.zeros((rows, width), dtype=dtype, device=device)
        finished = torch.zeros((rows, width), dtype=torch.bool, device=device)
        history = torch.empty((rows, width, 0), dtype=torch.int64, device=device)
        tokens = torch.full((rows * width,), BOS, dtype=torch.int64, device=device)
        offsets = torch.arange(rows, device=device).unsqueeze(1) * width
        for step in range(_max_length(model, max_length)):
            logits, state = model.next_token_logits(tokens, state)
            # The model's own log-probabilities (not renormalized without <pad> and <bos>).
            log_p = _never_emitted(F.log_softmax(logits.to(dtype), -1)).view(rows, width, -1)
            vocabulary = log_p.shape[-1]
            # An ended hypothesis continues only with <pad>, at no cost.
            ended = torch.full((vocabulary,), -math.inf, dtype=dtype, device=device)
            ended[PAD] = 0.0
            log_p = torch.where(finished.unsqueeze(-1), ended, log_p)
            candidates = scores.unsqueeze(-1) + log_p
            new_lengths = (lengths + (~finished).to(dtype)).unsqueeze(-1).expand_as(candidates)
            ranking = candidates / new_lengths if normalize_length else candidates
            _, best = ranking.reshape(rows, -1).topk(width, -1)
            beam, tokens_2d = best // vocabulary, best % vocabulary
            scores = candidates.reshape(rows, -1).gather(1, best)
            lengths = new_lengths.reshape(rows, -1).gather(1, best)
            finished = finished.gather(1, beam) | (tokens_2d == EOS)
            history = torch.cat([history.gather(1, beam.unsqueeze(-1).expand(-1, -1, step)), tokens_2d.unsqueeze(-1)], -1)
            state = model.select_states(state, (beam + offsets).reshape(-1))
            tokens = tokens_2d.reshape(-1)
            if bool(finished.all()):
                break
        final = scores / lengths.clamp(min=1) if normalize_length else scores
        chosen = final.argmax(-1)
        return _until_eos(history[torch.arange(rows, device=device), chosen])


METHODS: dict[str, Callable] = {"greedy": greedy_decode, "sample": sample_decode, "beam": beam_search}


def _decoder(method: str) -> Callable:
    if method not in METHODS:
        raise ValueError(f"method = {method!r} is not allowed: choose one of {', '.join(METHODS)}")
    return METHODS[method]


def decoding_options(method: str, beam_size: int = 5, temperature: float = 1.0, generator: torch.Generator | None = None) -> dict:
    """The keyword options of ``method``'s decoder: ``beam_size`` for "beam", ``temperature`` and
    ``generator`` for "sample", none for "greedy"."""
    _decoder(method)
    if method == "beam":
        return {"beam_size": beam_size}
    if method == "sample":
        return {"temperature": temperature, "generator": generator}
    return {}


def posterior_latent(model, guide, batch: Mapping, use_mean: bool = True, inputs: Mapping | None = None) -> torch.Tensor | None:
    """z of each row of ``batch`` under the guide, in evaluation mode: the mean of q(z | x) (or,
    with ``use_mean = False``, one draw); None for a model without a latent."""
    sites = [site.name for site in model.latent_sites]
    if not sites:
        return None
    if len(sites) != 1:
        raise ValueError(f"decoding reads one latent site; {type(model).__name__} declares {sites}")
    with _evaluating(model, guide):
        trace = poutine.trace(guide).get_trace(**{**batch, **(inputs or {})})
    site = trace.nodes[sites[0]]
    return site["fn"].mean if use_mean else site["value"]


def reconstruct(
    model,
    guide,
    batch: Mapping,
    method: str = "greedy",
    use_mean: bool = True,
    max_length: int | None = None,
    inputs: Mapping | None = None,
    **options,
) -> list[list[int]]:
    """Decode each sentence of ``batch`` from its z: the guide's mean (or a draw, ``use_mean =
    False``), with ``method`` "greedy", "sample" or "beam" (``options`` go to it: temperature,
    beam_size ...). The labels ``y`` of the batch condition a label-conditioned model."""
    decode = _decoder(method)
    z = posterior_latent(model, guide, batch, use_mean, inputs)
    y = batch.get("y")
    if z is None:  # no latent: the model decodes the same way for every row
        device, dtype = _device_and_dtype(model)
        z = torch.empty((batch["x"].shape[0], 0), dtype=dtype, device=device)
    return decode(model, z, max_length, y, **options)


def prior_sentences(
    model,
    count: int,
    method: str = "greedy",
    y: torch.Tensor | None = None,
    max_length: int | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> list[list[int]]:
    """``count`` sentences decoded from z ~ N(0, I) (the language model: from nothing), with
    ``method`` "greedy", "sample" or "beam"; ``y`` (count,) labels for a label-conditioned model.
    ``generator`` draws z (and the words, for "sample")."""
    decode = _decoder(method)
    device, dtype = _device_and_dtype(model)
    z = torch.randn((count, model.latent_size), dtype=dtype, device=device, generator=generator)
    if method == "sample":
        options.setdefault("generator", generator)
    return decode(model, z, max_length, y, **options)


def homotopy(
    model,
    guide,
    batch_a: Mapping,
    batch_b: Mapping,
    steps: int = 5,
    method: str = "greedy",
    max_length: int | None = None,
    inputs: Mapping | None = None,
    **options,
) -> list[list[int]]:
    """Sentences along the straight line between two posterior means (Bowman et al. 2016):

        z_i = (1 - t_i) mu_a + t_i mu_b,   t_i = i / (steps - 1),  i = 0 .. steps - 1

    with mu_a, mu_b the means of q(z | x) for the first sentence of ``batch_a`` and of
    ``batch_b``; a label-conditioned model decodes every z_i with the label of the first."""
    if model.latent_size == 0:
        raise ValueError(f"homotopy needs a latent z; {type(model).__name__} has none")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps = {steps!r} is not allowed: a homotopy needs at least 2 steps (its two ends)")
    first, second = rows_of(batch_a, slice(0, 1)), rows_of(batch_b, slice(0, 1))
    mean_a = posterior_latent(model, guide, first, inputs=inputs)
    mean_b = posterior_latent(model, guide, second, inputs=inputs)
    t = torch.linspace(0.0, 1.0, steps, dtype=mean_a.dtype, device=mean_a.device).unsqueeze(-1)
    z = (1 - t) * mean_a + t * mean_b
    y = first.get("y")
    return _decoder(method)(model, z, max_length, None if y is None else y.expand(steps), **options)


def rows_of(batch: Mapping, rows: slice) -> dict:
    """Those rows of every tensor of ``batch`` (other values, e.g. scheduled inputs, as they are)."""
    return {key: value[rows] if torch.is_tensor(value) else value for key, value in batch.items()}


def bag_of_words_f1(reference: list[int], hypothesis: list[int], ignored: tuple[int, ...] = (PAD, UNK, BOS, EOS)) -> float:
    """F1 of two sentences as bags of words (counts kept), the ``ignored`` ids left out:

        overlap = sum_w min(c_ref(w), c_hyp(w)),  P = overlap / |hyp|,  R = overlap / |ref|,
        F1 = 2 P R / (P + R)   (0 when either bag is empty or they share no word)."""
    left = Counter(word for word in reference if word not in ignored)
    right = Counter(word for word in hypothesis if word not in ignored)
    overlap = sum((left & right).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(right.values()), overlap / sum(left.values())
    return 2 * precision * recall / (precision + recall)


def reconstruction_f1(model, guide, batch: Mapping, inputs: Mapping | None = None, batch_size: int = 100, seed: int = 0) -> dict:
    """Whether the decoder uses z, in words: the mean bag-of-words F1 (:func:`bag_of_words_f1`,
    without <unk>, <eos> and padding) between each sentence of ``batch`` and

    - ``test_reconstruction_f1``: its greedy reconstruction from the mean of q(z | x);
    - ``test_prior_draw_f1``: a greedy decoding from its own draw z ~ N(0, I) (seeded), the chance
      level that frequent words give.

    A label-conditioned model decodes both with the sentence's label. Empty for a model without
    a latent."""
    if not getattr(model, "latent_size", 0):
        return {}
    generator = torch.Generator(device=_device_and_dtype(model)[0]).manual_seed(seed)
    count = int(batch["x"].shape[0])
    reconstructed, drawn, references = 0.0, 0.0, original_sentences(batch, count)
    for begin in range(0, count, batch_size):
        rows = rows_of(batch, slice(begin, begin + batch_size))
        labels = rows.get("y") if model.conditions_on_label else None
        rebuilt = reconstruct(model, guide, rows, "greedy", inputs=inputs)
        prior = prior_sentences(model, int(rows["x"].shape[0]), "greedy", y=labels, generator=generator)
        for reference, own, other in zip(references[begin : begin + batch_size], rebuilt, prior):
            reconstructed += bag_of_words_f1(reference, own)
            drawn += bag_of_words_f1(reference, other)
    return {"test_reconstruction_f1": reconstructed / count, "test_prior_draw_f1": drawn / count}


def sentence_text(vocabulary, ids: list[int]) -> str:
    """The words of ``ids`` joined by spaces; "(empty sentence)" for none."""
    return " ".join(vocabulary.decode(ids)) or "(empty sentence)"


def original_sentences(batch: Mapping, count: int) -> list[list[int]]:
    """The first ``count`` sentences of ``batch`` as ids, without padding or <eos>."""
    first = rows_of(batch, slice(0, count))
    _, lengths = real_positions(first["x"], first.get("mask"), first.get("lengths"))
    return _until_eos([row[:n] for row, n in zip(first["x"].tolist(), lengths.tolist())])


def write_text_samples(
    model,
    guide,
    batch: Mapping,
    vocabulary,
    path: str | Path,
    count: int = 8,
    inputs: Mapping | None = None,
    max_length: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write a readable UTF-8 text file of decoded sentences:

    - ``count`` samples from the prior, decoded greedily and by sampling (``temperature``);
    - the first ``count`` sentences of ``batch`` next to their greedy reconstructions from the
      guide's mean;
    - a 5-step homotopy between the first two sentences of ``batch``.

    ``vocabulary.decode(ids)`` turns ids into tokens. A label-conditioned model decodes the prior
    samples with the labels of the batch's first rows; the language model has no z, so it gets
    samples only. ``seed`` fixes the prior draws and the sampled words."""
    path = Path(path)
    device, _ = _device_and_dtype(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    count = min(count, int(batch["x"].shape[0]))
    labels = batch.get("y")
    y = labels[:count] if model.conditions_on_label and labels is not None else None

    def section(heading: str, sentences: list[list[int]]) -> list[str]:
        tags = [f"[y={int(label)}] " for label in y] if y is not None else [""] * len(sentences)
        return [f"== {heading} =="] + [tag + sentence_text(vocabulary, ids) for tag, ids in zip(tags, sentences)] + [""]

    name, latent = type(model).__name__, model.latent_size > 0
    prior = "Samples from the prior, " if latent else "Samples, "
    greedy = prior_sentences(model, count, "greedy", y=y, max_length=max_length, generator=generator)
    sampled = prior_sentences(
        model, count, "sample", y=y, max_length=max_length, generator=generator, temperature=temperature
    )
    lines = [f"Text samples of {name}", ""]
    lines += section(f"{prior}greedy decoding", greedy)
    lines += section(f"{prior}sampled (temperature {temperature:g})", sampled)
    if not latent:
        lines += [f"({name} has no latent variable: no reconstructions or homotopy.)", ""]
    else:
        first = rows_of(batch, slice(0, count))
        rebuilt = reconstruct(model, guide, first, "greedy", max_length=max_length, inputs=inputs)
        lines += ["== Reconstructions (z = mean of q(z | x), greedy decoding) =="]
        for row, (original, decoded) in enumerate(zip(original_sentences(batch, count), rebuilt)):
            tag = f"[y={int(y[row])}] " if y is not None else ""
            lines += [f"{tag}original:      {sentence_text(vocabulary, original)}", f"reconstructed: {sentence_text(vocabulary, decoded)}", ""]
        if batch["x"].shape[0] >= 2:
            path_z = homotopy(model, guide, batch, rows_of(batch, slice(1, 2)), steps=5, max_length=max_length, inputs=inputs)
            lines += ["== Homotopy between the first two sentences (greedy decoding) =="]
            lines += [f"{i / (len(path_z) - 1):.2f}  {sentence_text(vocabulary, ids)}" for i, ids in enumerate(path_z)] + [""]
    write_text_atomically(path, "\n".join(lines))
    return path
