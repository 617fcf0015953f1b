"""Decoding (pyrovae/analysis/decoding.py): greedy, sampled and beam-search decoding on scripted
models whose answers are known, the same decoders on the sentence models, reconstructions, prior
sentences, homotopies and the text-samples file."""

import itertools
import math

import pytest
import torch
from torch import nn

from pyrovae.analysis import decoding
from pyrovae.analysis.decoding import (
    beam_search,
    greedy_decode,
    homotopy,
    posterior_latent,
    prior_sentences,
    reconstruct,
    sample_decode,
    write_text_samples,
)
from pyrovae.data.text import BOS, EOS, PAD
from pyrovae.pair import DataSpec
from tests.test_sentence_vae import LATENT, lm_pair, tiny_data, vae_pair

A, B, C = 4, 5, 6
VOCABULARY = 8


class ScriptedModel(nn.Module):
    """A decodable model whose next-word distribution is a function of (row, words so far):
    ``script(row, prefix) -> {word: probability}`` (unlisted words get probability 0). Its
    "latent" z (N, 1) holds each row's number, so rows keep it when a beam repeats them. Counts
    its decoding steps."""

    latent_sites = ()
    latent_size = 0
    conditions_on_label = False

    def __init__(self, script, max_length: int = 10):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # decoding reads the device and dtype off a parameter
        self.script = script
        self.data = DataSpec("scripted", (max_length,), "categorical", num_categories=VOCABULARY, variable_length=True)
        self.steps = 0

    def decoder_context(self, z, y=None):
        return z

    def start_decoding(self, context, rows):
        return [(int(row), ()) for row in context[:, 0].tolist()]

    def next_token_logits(self, tokens, state):
        self.steps += 1
        state = [(row, prefix if token == BOS else prefix + (token,)) for (row, prefix), token in zip(state, tokens.tolist())]
        logits = torch.full((len(state), VOCABULARY), -1e4)
        for n, (row, prefix) in enumerate(state):
            for word, probability in self.script(row, prefix).items():
                logits[n, word] = math.log(probability)
        return logits, state

    def select_states(self, state, index):
        return [state[i] for i in index.tolist()]


def rows(count):
    """z of the scripted model: the row numbers."""
    return torch.arange(count, dtype=torch.float).unsqueeze(1)


def no_latent(count):
    return torch.empty(count, 0)


def table(probabilities):
    """A script from a dict prefix -> distribution; any other prefix ends the sentence. After its
    <eos> a sentence would go on with words, at a cost: a beam must not count them."""

    def script(row, prefix):
        if EOS in prefix:
            return {A: 0.5, B: 0.5}
        return probabilities.get(prefix, {EOS: 1.0})

    return script


def random_table(generator, depth: int):
    """Random next-word distributions over {A, B, <eos>} for every prefix of fewer than ``depth``
    words; a sentence of ``depth`` words ends."""
    probabilities = {}
    for length in range(depth):
        for prefix in itertools.product((A, B), repeat=length):
            weights = torch.rand(3, generator=generator) + 0.05
            probabilities[prefix] = dict(zip((A, B, EOS), (weights / weights.sum()).tolist()))
    return probabilities


def reference_beam_search(probabilities, beam_size, normalize_length, max_length=10):
    """Beam search written out plainly: hypotheses (words, log p, length, ended), an ended one
    carried over unchanged, ranked by log p (per word with ``normalize_length``)."""
    key = lambda hypothesis: hypothesis[1] / hypothesis[2] if normalize_length else hypothesis[1]  # noqa: E731
    beam = [((), 0.0, 0, False)]
    for _ in range(max_length):
        candidates = []
        for words, score, length, ended in beam:
            if ended:
                candidates.append((words, score, length, True))
                continue
            for word, probability in probabilities.get(words, {EOS: 1.0}).items():
                candidates.append((words + (word,), score + math.log(probability), length + 1, word == EOS))
        beam = sorted(candidates, key=key, reverse=True)[:beam_size]
        if all(ended for *_, ended in beam):
            break
    words = max(beam, key=key)[0]
    return list(words[:-1] if words[-1] == EOS else words)


def sentence_log_prob(probabilities, words):
    total, prefix = 0.0, ()
    for word in list(words) + [EOS]:
        total += math.log(probabilities.get(prefix, {EOS: 1.0}).get(word, 1e-300))
        prefix = prefix + (word,)
    return total


# --- the decoders on scripted models --------------------------------------------------------------


def test_greedy_decoding_stops_at_eos_and_leaves_it_out():
    # Row r says "A" r + 1 times, then <eos>, then would go on with "C" forever.
    def script(row, prefix):
        if EOS in prefix:
            return {C: 1.0}
        return {A: 0.9, B: 0.1} if len(prefix) <= row else {EOS: 0.9, B: 0.1}

    model = ScriptedModel(script)
    assert greedy_decode(model, rows(3), max_length=10) == [[A], [A, A], [A, A, A]]
    assert model.steps == 4  # stopped once the longest row had emitted its <eos>
    never_ending = ScriptedModel(lambda row, prefix: {B: 1.0})
    assert greedy_decode(never_ending, rows(2), max_length=5) == [[B] * 5, [B] * 5]
    assert beam_search(never_ending, rows(2), max_length=5, beam_size=3) == [[B] * 5, [B] * 5]


def test_pad_and_bos_are_never_emitted():
    model = ScriptedModel(table({(): {PAD: 0.5, BOS: 0.3, A: 0.2}}))
    assert greedy_decode(model, rows(2), 5) == [[A], [A]]
    assert sample_decode(model, rows(50), 5, generator=torch.Generator().manual_seed(0)) == [[A]] * 50
    assert beam_search(model, rows(2), 5, beam_size=3) == [[A], [A]]


def test_beam_search_finds_the_more_probable_sentence_greedy_misses():
    probabilities = {(): {A: 0.55, B: 0.45}, (A,): {A: 0.4, B: 0.35, EOS: 0.25}}
    model = ScriptedModel(table(probabilities))
    assert greedy_decode(model, rows(1), 10) == [[A, A]]  # probability 0.22
    assert beam_search(model, rows(1), 10, beam_size=1) == [[A, A]]
    assert beam_search(model, rows(1), 10, beam_size=2) == [[B]]  # probability 0.45


def test_length_normalization_ranks_by_the_score_per_word():
    # [B] has probability 0.42 (-0.434 nats a word, <eos> counted); [A, A] 0.294 (-0.408 a word).
    probabilities = {(): {A: 0.3, B: 0.7}, (B,): {EOS: 0.6, A: 0.4}, (A,): {A: 0.99, EOS: 0.01}, (A, A): {EOS: 0.99, B: 0.01}}
    model = ScriptedModel(table(probabilities))
    assert beam_search(model, rows(1), 10, beam_size=2) == [[B]]
    assert beam_search(model, rows(1), 10, beam_size=2, normalize_length=True) == [[A, A]]


def test_a_beam_as_wide_as_every_hypothesis_finds_the_most_probable_sentence():
    # Sentences of up to 3 words over {A, B}: 15 in all, at most 8 live prefixes, so a beam of 8 is exhaustive.
    probabilities = random_table(torch.Generator().manual_seed(0), depth=3)
    every = [list(words) for length in range(4) for words in itertools.product((A, B), repeat=length)]
    model = ScriptedModel(table(probabilities))
    for normalize in (False, True):
        key = lambda words: sentence_log_prob(probabilities, words) / ((len(words) + 1) if normalize else 1)  # noqa: E731
        assert beam_search(model, rows(1), 10, beam_size=8, normalize_length=normalize) == [max(every, key=key)]


def test_narrow_beams_agree_with_a_plain_beam_search():
    generator = torch.Generator().manual_seed(1)
    tables = [random_table(generator, depth=4) for _ in range(12)]
    # One row per table, all decoded at once.
    model = ScriptedModel(lambda row, prefix: table(tables[row])(row, prefix))
    for beam_size in (2, 3):
        for normalize in (False, True):
            expected = [reference_beam_search(t, beam_size, normalize) for t in tables]
            assert beam_search(model, rows(len(tables)), 10, beam_size=beam_size, normalize_length=normalize) == expected
    # Not a vacuous comparison: the beams do not all find what greedy decoding finds.
    assert expected != greedy_decode(model, rows(len(tables)), 10)


def test_sampled_words_follow_the_tempered_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])
    model = ScriptedModel(table({(): dict(zip((A, B, C), p.tolist()))}))
    draws = 4000
    for temperature, expected in ((1.0, p), (0.5, p**2 / (p**2).sum())):
        sentences = sample_decode(model, rows(draws), 3, temperature=temperature, generator=torch.Generator().manual_seed(1))
        assert all(len(words) == 1 for words in sentences)
        counts = torch.tensor([sum(words == [word] for words in sentences) for word in (A, B, C)], dtype=torch.float)
        # Each frequency within 5 binomial standard errors of its probability.
        standard_errors = (expected * (1 - expected) / draws).sqrt()
        assert ((counts / draws - expected).abs() < 5 * standard_errors).all(), (temperature, counts / draws)


# --- the decoders on the sentence models ----------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return tiny_data()


@pytest.fixture(scope="module")
def labelled():
    return tiny_data(labels=True)


@pytest.mark.parametrize("decoder", ["lstm", "dilated_cnn"])
def test_beam_one_is_greedy_on_the_sentence_models(decoder, data, labelled):
    torch.manual_seed(0)
    z = torch.randn(6, LATENT) * 3
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cases = [
        (vae_pair(data, decoder)[0], z, None),
        (vae_pair(labelled, decoder, labels=True)[0], z, y),
        (lm_pair(data, decoder)[0], no_latent(6), None),
        (lm_pair(labelled, decoder, labels=True)[0], None, y),
    ]
    for model, latent, labels in cases:
        greedy = greedy_decode(model, latent, 12, labels)
        assert len(greedy) == 6
        assert beam_search(model, latent, 12, labels, beam_size=1) == greedy
        for words in greedy + beam_search(model, latent, 12, labels, beam_size=3):
            assert len(words) <= 12 and EOS not in words and all(3 < w < 20 or w == 1 for w in words)


def test_a_model_that_prefers_eos_decodes_empty_sentences_in_one_step(data):
    torch.manual_seed(0)
    model, _ = vae_pair(data)
    with torch.no_grad():
        model.decoder.output.bias[EOS] = 100.0
    steps = []
    original = model.next_token_logits
    model.next_token_logits = lambda tokens, state: (steps.append(1), original(tokens, state))[1]
    assert greedy_decode(model, torch.randn(4, LATENT), 10) == [[], [], [], []]
    assert len(steps) == 1


def test_decoding_leaves_the_modes_as_they_were(data):
    torch.manual_seed(0)
    model, guide = vae_pair(data, dropout=0.5)
    model.train()
    first = greedy_decode(model, torch.ones(2, LATENT), 10)
    assert model.training
    assert greedy_decode(model, torch.ones(2, LATENT), 10) == first  # no dropout while decoding


def test_reconstructions_decode_the_guide_mean(data):
    torch.manual_seed(0)
    model, guide = vae_pair(data)
    batch = {key: value[:5] for key, value in data.test.items()}
    mean = posterior_latent(model, guide, batch)
    assert mean.shape == (5, LATENT)
    assert reconstruct(model, guide, batch) == greedy_decode(model, mean)
    assert reconstruct(model, guide, batch, "beam", beam_size=1) == greedy_decode(model, mean)
    drawn = posterior_latent(model, guide, batch, use_mean=False)
    assert drawn.shape == mean.shape and not torch.equal(drawn, mean)
    lm, no_latents = lm_pair(data)
    assert reconstruct(lm, no_latents, batch) == greedy_decode(lm, no_latent(5))


def test_prior_sentences(data, labelled):
    torch.manual_seed(0)
    model, _ = vae_pair(data)
    first = prior_sentences(model, 5, "sample", max_length=7, generator=torch.Generator().manual_seed(3))
    again = prior_sentences(model, 5, "sample", max_length=7, generator=torch.Generator().manual_seed(3))
    assert first == again and len(first) == 5 and all(len(words) <= 7 for words in first)
    assert len(prior_sentences(model, 4, "beam", beam_size=2)) == 4
    lm, _ = lm_pair(data)
    assert len(prior_sentences(lm, 3, "sample")) == 3
    conditioned, _ = vae_pair(labelled, labels=True)
    assert len(prior_sentences(conditioned, 3, y=torch.tensor([0, 1, 2]))) == 3
    with pytest.raises(ValueError, match=r"condition_on_label = true: give the labels y"):
        prior_sentences(conditioned, 3)


def test_homotopy_walks_the_line_between_the_two_posterior_means(data, monkeypatch):
    torch.manual_seed(0)
    model, guide = vae_pair(data)
    first, second = ({key: value[n : n + 1] for key, value in data.test.items()} for n in (0, 1))
    mean_a, mean_b = posterior_latent(model, guide, first), posterior_latent(model, guide, second)
    path = homotopy(model, guide, first, second, steps=5)
    assert len(path) == 5
    assert path[0] == greedy_decode(model, mean_a)[0] and path[-1] == greedy_decode(model, mean_b)[0]
    seen = {}

    def record(model, z, max_length, y, **options):
        seen["z"] = z
        return []

    monkeypatch.setitem(decoding.METHODS, "greedy", record)
    homotopy(model, guide, data.test, {key: value[1:] for key, value in data.test.items()}, steps=5)
    z = seen["z"]
    torch.testing.assert_close(z[0], mean_a[0], rtol=0, atol=0)
    torch.testing.assert_close(z[-1], mean_b[0], rtol=0, atol=0)
    torch.testing.assert_close(z[2], (mean_a[0] + mean_b[0]) / 2)
    lm, no_latents = lm_pair(data)
    with pytest.raises(ValueError, match=r"homotopy needs a latent z; LanguageModel has none"):
        homotopy(lm, no_latents, first, second)


class StandInVocabulary:
    def decode(self, ids):
        return [f"wörd{i}" for i in ids]


def test_write_text_samples(tmp_path, data, labelled):
    torch.manual_seed(0)
    model, guide = vae_pair(data)
    batch = data.test
    path = write_text_samples(model, guide, batch, StandInVocabulary(), tmp_path / "samples.txt", count=3)
    text = path.read_text(encoding="utf-8")
    for heading in (
        "== Samples from the prior, greedy decoding ==",
        "== Samples from the prior, sampled (temperature 1) ==",
        "== Reconstructions (z = mean of q(z | x), greedy decoding) ==",
        "== Homotopy between the first two sentences (greedy decoding) ==",
    ):
        assert heading in text
    for n in range(3):
        words = batch["x"][n, : batch["lengths"][n] - 1].tolist()
        assert f"original:      {' '.join(f'wörd{i}' for i in words)}\n" in text
    assert text.count("reconstructed: ") == 3 and text.count("\n0.50  ") == 1
    again = write_text_samples(model, guide, batch, StandInVocabulary(), tmp_path / "again.txt", count=3)
    assert again.read_text(encoding="utf-8") == text  # seeded: the same file
    lm, no_latents = lm_pair(data)
    text = write_text_samples(lm, no_latents, batch, StandInVocabulary(), tmp_path / "lm.txt").read_text(encoding="utf-8")
    assert "== Samples, greedy decoding ==" in text and "no reconstructions or homotopy" in text and "original:" not in text
    conditioned, conditioned_guide = vae_pair(labelled, labels=True)
    text = write_text_samples(conditioned, conditioned_guide, labelled.test, StandInVocabulary(), tmp_path / "y.txt", count=2).read_text(encoding="utf-8")
    label = int(labelled.test["y"][1])
    assert f"[y={label}] original:" in text


def test_bad_decoding_options_are_refused_in_one_line(data):
    model, guide = vae_pair(data)
    z = torch.zeros(2, LATENT)
    with pytest.raises(ValueError, match=r"method = 'nucleus' is not allowed: choose one of greedy, sample, beam"):
        reconstruct(model, guide, data.test, method="nucleus")
    with pytest.raises(ValueError, match=r"beam_size = 0 is not allowed"):
        beam_search(model, z, 5, beam_size=0)
    with pytest.raises(ValueError, match=r"temperature = 0 is not allowed"):
        sample_decode(model, z, 5, temperature=0)
    with pytest.raises(ValueError, match=r"max_length = 0 is not allowed"):
        greedy_decode(model, z, 0)
    with pytest.raises(ValueError, match=r"steps = 1 is not allowed"):
        homotopy(model, guide, data.test, data.test, steps=1)
    with pytest.raises(ValueError, match=r"z has 2 rows but y has 3"):
        greedy_decode(model, z, 5, torch.tensor([0, 1, 2]))
