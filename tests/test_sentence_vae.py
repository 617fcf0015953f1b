"""Sentence models (models/sentence.py, guides/sentence.py, pyrovae/nn/sequence.py): the pair's sites,
masking of padding, word dropout, causality of the CNN decoder, word-by-word decoding against
teacher forcing, label conditioning, one optimizer step, and word_keep driven through the fit loop."""

import pyrovae
import pyro
import pytest
import torch
from pyro import poutine

from pyrovae.data import sequence_splits
from pyrovae.data.text import BOS, EOS, PAD, UNK
from pyrovae.errors import DataError
from pyrovae.experiment import Experiment
from pyrovae.guides import NoLatentsConfig, NoLatentsGuide, SentenceLSTMGuide, SentenceLSTMGuideConfig
from pyrovae.models import LanguageModel, LanguageModelConfig, SentenceVAE, SentenceVAEConfig
from pyrovae.likelihoods import WordCategorical
from pyrovae.nn import teacher_forcing_inputs, word_dropout
from pyrovae.objectives import build_objective
from pyrovae.pair import DataSpec, check_pair
from pyrovae.schedules import Constant
from pyrovae.traces import trace_pair
from pyrovae.train import TrainConfig, fit

VOCABULARY = 20
LATENT = 4
DECODERS = ("lstm", "dilated_cnn")
SMALL = {"embedding_dim": 8, "hidden": 16, "channels": 16}


def sentences(count: int, seed: int, shortest: int = 1, longest: int = 8) -> list[list[int]]:
    """Rows of random words (ids >= 4: no special token) followed by <eos>."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        words = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
        rows.append(torch.randint(4, VOCABULARY, (words,), generator=generator).tolist() + [EOS])
    return rows


def tiny_data(labels: bool = False):
    train, test = sentences(48, 0), sentences(8, 1)
    if labels:
        train = {"x": train, "y": [n % 3 for n in range(len(train))]}
        test = {"x": test, "y": [n % 3 for n in range(len(test))]}
    return sequence_splits(train, test, validation=8, num_categories=VOCABULARY, num_classes=3 if labels else None)


@pyrovae.data_loader
def tiny_sentences(labels: bool = False, seed: int = 0):
    """The tiny data set as a loader, for the TOML test."""
    return tiny_data(labels)


def vae_pair(data, decoder="lstm", labels=False, **options):
    config = SentenceVAEConfig(**SMALL, latent_dim=LATENT, decoder=decoder, condition_on_label=labels, **options)
    model = SentenceVAE(config, data.spec)
    guide = SentenceLSTMGuide(SentenceLSTMGuideConfig(embedding_dim=8, hidden=16, condition_on_label=labels), data.spec, model)
    return model, guide


def lm_pair(data, decoder="lstm", labels=False):
    model = LanguageModel(LanguageModelConfig(**SMALL, decoder=decoder, condition_on_label=labels), data.spec)
    return model, NoLatentsGuide(NoLatentsConfig(), data.spec, model)


def rows_of(batch, index):
    return {key: value[index] for key, value in batch.items()}


def log_likelihood(model, batch, z=None) -> torch.Tensor:
    """log p(x_n | z_n) per row, at the given z (none for the language model)."""
    run = poutine.condition(model, data={"z": z}) if z is not None else model
    model.eval()
    with torch.no_grad():
        trace = poutine.trace(run).get_trace(**batch)
    trace.compute_log_prob()
    return trace.nodes["x"]["log_prob"]


def guide_mean(guide, batch) -> torch.Tensor:
    with torch.no_grad():
        return poutine.trace(guide).get_trace(**batch).nodes["z"]["fn"].mean


def padded(batch, extra: int, seed: int = 0):
    """The batch with ``extra`` more columns, and every padded position (old and new) filled
    with random words instead of <pad>: none of it may count."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([batch["x"], torch.full((batch["x"].shape[0], extra), PAD)], 1)
    mask = torch.arange(x.shape[1]) < batch["lengths"].unsqueeze(-1)
    noise = torch.randint(4, VOCABULARY, x.shape, generator=generator)
    return {**batch, "x": torch.where(mask, x, noise), "mask": mask}


@pytest.fixture(scope="module")
def data():
    return tiny_data()


@pytest.fixture(scope="module")
def labelled():
    return tiny_data(labels=True)


# --- the pair ----------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("labels", [False, True])
def test_pairs_have_consistent_sites(decoder, labels, data, labelled):
    splits = labelled if labels else data
    torch.manual_seed(0)
    check_pair(*vae_pair(splits, decoder, labels), splits.train)
    check_pair(*lm_pair(splits, decoder, labels), splits.train)


@pytest.mark.parametrize("decoder", DECODERS)
def test_sample_shapes(decoder, data):
    torch.manual_seed(0)
    model, guide = vae_pair(data, decoder)
    batch = data.train
    rows, length = batch["x"].shape
    model_trace, guide_trace = trace_pair(model, guide, batch, max_plate_nesting=1)
    assert guide_trace.nodes["z"]["value"].shape == (rows, LATENT)
    words = model_trace.nodes["x"]["fn"]
    assert words.batch_shape == (rows,) and words.event_shape == (length,)
    assert model_trace.nodes["x"]["log_prob"].shape == (rows,)
    drawn = words.sample()
    assert drawn.shape == (rows, length) and drawn.dtype == torch.int64 and 0 <= drawn.min() and drawn.max() < VOCABULARY
    # Vectorized particles (IWAE, the importance-sampled log-likelihood) add a dim on the left.
    model_trace, guide_trace = trace_pair(model, guide, batch, max_plate_nesting=1, particles=3)
    assert guide_trace.nodes["z"]["value"].shape == (3, rows, LATENT)
    assert model_trace.nodes["x"]["log_prob"].shape == (3, rows)


def test_word_categorical_equals_pyro_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, VOCABULARY, requires_grad=True)
    words = torch.randint(0, VOCABULARY, (5, 7))  # broadcast against 3 particles
    ours = WordCategorical(logits).log_prob(words)
    (reference_logits,) = [logits.detach().clone().requires_grad_()]
    theirs = pyro.distributions.Categorical(logits=reference_logits).log_prob(words)
    torch.testing.assert_close(ours, theirs)
    weights = torch.randn(3, 5, 7)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad)
    assert WordCategorical(logits).expand((2, 3, 5, 7)).log_prob(words).shape == (2, 3, 5, 7)


def test_projected_word_categorical_scores_in_slices_as_the_whole_logits_do(monkeypatch):
    # The model's site: logits = W h + b, scored a slice of rows at a time (here 3 of the 105
    # positions a slice, so 35 slices). Values and every gradient equal WordCategorical's on the
    # whole logits; sampling and expand read the same logits.
    import pyrovae.likelihoods as likelihoods
    import pyrovae.nn.sequence as sequence

    monkeypatch.setattr(sequence, "LOGIT_SLICE_ELEMENTS", 3 * VOCABULARY)
    whole_cross_entropy, slices = torch.nn.functional.cross_entropy, []

    def counted_cross_entropy(logits, *args, **kwargs):
        slices.append(tuple(logits.shape))
        return whole_cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(sequence.F, "cross_entropy", counted_cross_entropy)
    torch.manual_seed(0)
    features = torch.randn(3, 5, 7, 6, requires_grad=True)
    weight, bias = torch.randn(VOCABULARY, 6, requires_grad=True), torch.randn(VOCABULARY, requires_grad=True)
    words = torch.randint(0, VOCABULARY, (5, 7))  # broadcast against 3 particles
    projected = likelihoods.ProjectedWordCategorical(features, weight, bias)
    ours = projected.log_prob(words)
    copies = [t.detach().clone().requires_grad_() for t in (features, weight, bias)]
    theirs = WordCategorical(torch.nn.functional.linear(*copies)).log_prob(words)
    torch.testing.assert_close(ours, theirs)
    assert slices[:35] == [(3, VOCABULARY)] * 35  # the projected site's 35 slices; then the reference's whole call
    scales = torch.randn(3, 5, 7)
    (ours * scales).sum().backward()
    (theirs * scales).sum().backward()
    for mine, reference in zip((features, weight, bias), copies):
        torch.testing.assert_close(mine.grad, reference.grad)
    torch.testing.assert_close(projected.logits, torch.nn.functional.linear(features, weight, bias))
    assert projected.expand((2, 3, 5, 7)).log_prob(words).shape == (2, 3, 5, 7)
    assert projected.sample().shape == (3, 5, 7)


# --- padding and lengths -------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
def test_padding_changes_no_log_probability_and_no_guide_mean(decoder, data):
    torch.manual_seed(0)
    model, guide = vae_pair(data, decoder)
    batch = data.train
    z = torch.randn(batch["x"].shape[0], LATENT)
    longer = padded(batch, extra=3)
    torch.testing.assert_close(log_likelihood(model, longer, z), log_likelihood(model, batch, z))
    torch.testing.assert_close(guide_mean(guide, longer), guide_mean(guide, batch))
    # The same with only a mask, or only lengths, in the batch.
    only_mask = {key: value for key, value in longer.items() if key != "lengths"}
    only_lengths = {key: value for key, value in longer.items() if key != "mask"}
    torch.testing.assert_close(log_likelihood(model, only_mask, z), log_likelihood(model, batch, z))
    torch.testing.assert_close(guide_mean(guide, only_lengths), guide_mean(guide, batch))
    lm, _ = lm_pair(data, decoder)
    torch.testing.assert_close(log_likelihood(lm, longer), log_likelihood(lm, batch))


@pytest.mark.parametrize("decoder", DECODERS)
def test_each_sentence_of_a_mixed_length_batch_has_the_likelihood_it_has_alone(decoder):
    rows = [sentences(1, 2, 1, 1)[0], sentences(1, 3, 4, 4)[0], sentences(1, 4, 7, 7)[0]]  # 2, 5 and 8 ids
    data = sequence_splits(rows, rows, valid=rows, num_categories=VOCABULARY)
    batch = data.train
    assert batch["lengths"].tolist() == [2, 5, 8]
    torch.manual_seed(0)
    model, guide = vae_pair(data, decoder)
    lm, _ = lm_pair(data, decoder)
    z = torch.randn(3, LATENT)
    together, together_lm, means = log_likelihood(model, batch, z), log_likelihood(lm, batch), guide_mean(guide, batch)
    for n, length in enumerate(batch["lengths"].tolist()):
        alone = {key: value[n : n + 1] for key, value in batch.items()}
        alone = {**alone, "x": alone["x"][:, :length], "mask": alone["mask"][:, :length]}
        torch.testing.assert_close(log_likelihood(model, alone, z[n : n + 1]), together[n : n + 1])
        torch.testing.assert_close(log_likelihood(lm, alone), together_lm[n : n + 1])
        torch.testing.assert_close(guide_mean(guide, alone), means[n : n + 1])
    # Not trivially equal: the three sentences differ in likelihood.
    assert len(set(together.tolist())) == 3


# --- word dropout ----------------------------------------------------------------------------------


def test_word_dropout_keeps_bos_and_padding_and_drops_at_the_rate_asked():
    tokens = teacher_forcing_inputs(torch.randint(4, VOCABULARY, (200, 30), generator=torch.Generator().manual_seed(0)))
    tokens[:, 20:] = PAD
    # keep = 1 drops nothing; a 0-dim tensor keep (a compiled step's input) is the same operation.
    assert torch.equal(word_dropout(tokens, 1.0, training=True), tokens)
    assert torch.equal(word_dropout(tokens, torch.tensor(1.0), training=True), tokens)
    assert word_dropout(tokens, 0.0, training=False) is tokens
    torch.manual_seed(3)
    as_float = word_dropout(tokens, 0.6, training=True)
    torch.manual_seed(3)
    assert torch.equal(word_dropout(tokens, torch.tensor(0.6), training=True), as_float)
    none_kept = word_dropout(tokens, 0.0, training=True)
    assert (none_kept[:, 0] == BOS).all() and (none_kept[:, 1:20] == UNK).all() and (none_kept[:, 20:] == PAD).all()
    some_kept = word_dropout(tokens, 0.7, training=True, generator=torch.Generator().manual_seed(1))
    words = tokens[:, 1:20]
    dropped = (some_kept[:, 1:20] != words).float()
    assert ((some_kept[:, 1:20] == words) | (some_kept[:, 1:20] == UNK)).all()
    assert torch.equal(some_kept[:, 0], tokens[:, 0]) and torch.equal(some_kept[:, 20:], tokens[:, 20:])
    # 3,800 Bernoulli(0.3) drops: the rate is within 5 standard errors (0.037) of 0.3.
    standard_error = (0.3 * 0.7 / dropped.numel()) ** 0.5
    assert abs(dropped.mean().item() - 0.3) < 5 * standard_error
    with pytest.raises(ValueError, match=r"word_keep = 1.5 is not allowed: a keep rate must lie in \[0, 1\]"):
        word_dropout(tokens, 1.5, training=True)


@pytest.mark.parametrize("decoder", DECODERS)
def test_word_keep_controls_what_the_decoder_reads(decoder, data):
    torch.manual_seed(0)
    model, _ = vae_pair(data, decoder)
    seen = []
    model.decoder.embedding.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    batch = data.train
    z = torch.randn(batch["x"].shape[0], LATENT)
    run = poutine.condition(model, data={"z": z})
    expected = teacher_forcing_inputs(batch["x"])
    real = batch["mask"]
    model.train()
    run(**batch, word_keep=1.0)
    assert torch.equal(seen[-1], expected)
    run(**batch, word_keep=0.0)
    assert (seen[-1][:, 0] == BOS).all()
    assert (seen[-1][:, 1:][real[:, 1:]] == UNK).all()  # every word the decoder reads at a real position
    model.eval()  # evaluation ignores word dropout
    run(**batch, word_keep=0.0)
    assert torch.equal(seen[-1], expected)


# --- decoders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_are_causal(decoder, data):
    torch.manual_seed(0)
    model, _ = vae_pair(data, decoder)
    model.eval()
    x = torch.randint(4, VOCABULARY, (4, 12), generator=torch.Generator().manual_seed(0))
    context = model.decoder_context(torch.randn(4, LATENT))
    with torch.no_grad():
        logits = model.decoder(teacher_forcing_inputs(x), context)
        for t in (0, 5, 10):
            changed = x.clone()
            changed[:, t] = 4 + (changed[:, t] - 3) % (VOCABULARY - 4)  # another word
            other = model.decoder(teacher_forcing_inputs(changed), context)
            torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=0)
            assert (other[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("labels", [False, True])
def test_word_by_word_decoding_gives_the_teacher_forced_logits(decoder, labels, data, labelled):
    # Dilations [1, 2] with kernel 2 see 4 words: the sentence is longer, so the CNN's windowed
    # prefix is exercised; LSTM decoding carries its state.
    splits = labelled if labels else data
    torch.manual_seed(0)
    options = {"dilations": [1, 2], "kernel_size": 2} if decoder == "dilated_cnn" else {}
    for model in (vae_pair(splits, decoder, labels, **options)[0], lm_pair(splits, decoder, labels)[0]):
        model.eval()
        x = torch.randint(4, VOCABULARY, (3, 10), generator=torch.Generator().manual_seed(0))
        y = torch.tensor([0, 1, 2]) if labels else None
        z = torch.randn(3, LATENT) if model.latent_size else None
        context = model.decoder_context(z, y)
        inputs = teacher_forcing_inputs(x)
        with torch.no_grad():
            expected = model.decoder(inputs, context)
            state = model.start_decoding(context, 3)
            for t in range(inputs.shape[1]):
                logits, state = model.next_token_logits(inputs[:, t], state)
                torch.testing.assert_close(logits, expected[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_condition_on_label_makes_the_logits_depend_on_y(decoder, labelled):
    torch.manual_seed(0)
    model, guide = vae_pair(labelled, decoder, labels=True)
    lm, _ = lm_pair(labelled, decoder, labels=True)
    inputs = teacher_forcing_inputs(labelled.train["x"][:3])
    z = torch.randn(3, LATENT)
    with torch.no_grad():
        for part, latent in ((model, z), (lm, None)):
            first = part.decoder(inputs, part.decoder_context(latent, torch.tensor([0, 0, 0])))
            second = part.decoder(inputs, part.decoder_context(latent, torch.tensor([1, 2, 1])))
            assert (first - second).abs().amax(dim=(1, 2)).min() > 1e-4
        batch = rows_of(labelled.train, slice(0, 3))
        assert (guide_mean(guide, batch) - guide_mean(guide, {**batch, "y": (batch["y"] + 1) % 3})).abs().amax(-1).min() > 1e-4
    with pytest.raises(DataError, match=r"SentenceVAE conditions on labels \(condition_on_label\): batch\['y'\] is missing"):
        model.check_batch({key: value for key, value in labelled.train.items() if key != "y"})


def test_unconditioned_decoders_ignore_labels(labelled):
    torch.manual_seed(0)
    model, _ = vae_pair(labelled)
    z = torch.randn(3, LATENT)
    assert torch.equal(model.decoder_context(z, torch.tensor([0, 1, 2])), z)


# --- training ------------------------------------------------------------------------------------


def one_step_lowers_the_loss(model, guide, batch, objective_name="meanfield_elbo"):
    objective = build_objective(objective_name)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-2)
    call = {**batch, "word_keep": 1.0}
    model.train()
    guide.train()
    pyro.set_rng_seed(0)
    before, _ = objective(model, guide, call)
    before.backward()
    optimizer.step()
    pyro.set_rng_seed(0)  # the same z draws: only the parameters changed
    with torch.no_grad():
        after, _ = objective(model, guide, call)
    return before.item(), after.item()


@pytest.mark.parametrize("decoder", DECODERS)
def test_one_adam_step_lowers_the_loss(decoder, data):
    torch.manual_seed(0)
    before, after = one_step_lowers_the_loss(*vae_pair(data, decoder), data.train)
    assert after < before - 1e-3
    before, after = one_step_lowers_the_loss(*lm_pair(data, decoder), data.train)
    assert after < before - 1e-3


def test_word_keep_reaches_the_decoder_from_a_schedule_in_the_fit_loop(data):
    torch.manual_seed(0)
    model, guide = vae_pair(data)
    read_in_training = []

    def record(module, args, output):
        if module.training and torch.is_grad_enabled():  # training steps, not the loop's look-aheads
            read_in_training.append(args[0].clone())

    model.decoder.embedding.register_forward_hook(record)
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", lr=1e-3)
    result = fit(model, guide, build_objective("meanfield_elbo"), data, config, inputs={"word_keep": Constant(0.0)}, progress=False)
    assert len(read_in_training) == result.state.step > 0
    for inputs in read_in_training:  # keep rate 0: the decoder read <unk> for every word
        assert (inputs[:, 0] == BOS).all() and ((inputs[:, 1:] == UNK) | (inputs[:, 1:] == PAD)).all()
    assert result.state.history[-1]["schedule/word_keep"] == 0.0


def test_a_toml_experiment_builds_the_pair_and_schedules_word_keep():
    config = {
        "seed": 0,
        "data": {"name": "tests.test_sentence_vae:tiny_sentences"},
        "model": {"name": "sentence_vae", **SMALL, "latent_dim": 4, "decoder": "dilated_cnn", "dilations": [1, 2]},
        "guide": {"name": "sentence_lstm", "embedding_dim": 8, "hidden": 16, "share_embedding": True},
        "objective": {"name": "meanfield_elbo"},
        "schedules": {"word_keep": {"name": "linear", "warmup_steps": 10, "start": 0.5, "end": 1.0}},
        "train": {"epochs": 1, "batch_size": 16},
    }
    experiment = Experiment.from_config(config)
    assert isinstance(experiment.model, SentenceVAE) and isinstance(experiment.guide, SentenceLSTMGuide)
    assert experiment.guide.encoder.embedding is experiment.model.decoder.embedding
    assert experiment.inputs() == {"word_keep": 0.5}



# --- Zhao et al. 2017's bag-of-words term ------------------------------------------------------------


def bag_of_words_by_hand(model, z: torch.Tensor, batch) -> torch.Tensor:
    """sum over each row's real words (not <eos>) of log softmax(f_bow(z_n))[word], one row at a time."""
    totals = []
    for n in range(z.shape[0]):
        log_probs = torch.log_softmax(model.bag_of_words(z[n]), -1)
        words = [int(w) for w in batch["x"][n, : int(batch["lengths"][n])] if int(w) != EOS]
        totals.append(sum(log_probs[w] for w in words))
    return torch.stack(totals)


BAG_OF_WORDS_OBJECTIVES = {
    "meanfield_elbo": {},
    "elbo": {"particles": 3},
    "free_bits": {"threshold": 0.5, "objective": "meanfield_elbo"},
    "iwae": {"particles": 3},
    "enum_elbo": {},
    "pyro:RenyiELBO": {"alpha": 0.5, "num_particles": 2},
}


@pytest.mark.parametrize("objective_name", list(BAG_OF_WORDS_OBJECTIVES))
def test_the_bag_of_words_term_is_in_the_training_loss_and_in_no_reported_number(objective_name, data):
    torch.manual_seed(0)
    model, guide = vae_pair(data, "dilated_cnn", bag_of_words_weight=2.0)
    objective = build_objective(objective_name, **BAG_OF_WORDS_OBJECTIVES[objective_name])
    batch = data.rows("train", 0, 16)
    objective(model, guide, batch)  # first call: the objective's one-off checks draw too
    model.config.bag_of_words_weight = 0.0  # the term off: the generative model alone
    pyro.set_rng_seed(0)
    plain_loss, plain = objective(model, guide, batch)
    model.config.bag_of_words_weight = 2.0
    pyro.set_rng_seed(0)  # the same draws
    loss, metrics = objective(model, guide, batch)
    assert not any(key.startswith("auxiliary/") for key in plain)
    for key in plain:  # every reported number leaves the term out
        torch.testing.assert_close(metrics[key], plain[key], msg=key)
    if objective_name.startswith("pyro:"):  # Pyro writes the gradients itself (loss_and_grads)
        assert float(loss.detach()) > float(plain_loss.detach()) + 1.0  # the loss holds -2 x log-probabilities of words
        assert float(metrics["auxiliary/bag_of_words"]) < -1.0
        return
    # The loss holds it: its gradient reaches f_bow and, through z, the guide.
    gradients = torch.autograd.grad(loss, [model.bag_of_words[0].weight, guide.head.weight])
    assert all(bool(g.abs().sum() > 0) for g in gradients)
    term = metrics["auxiliary/bag_of_words"]
    if objective_name != "free_bits":  # the loss is the plain loss minus the term
        torch.testing.assert_close(loss.detach(), plain_loss.detach() - term)
    if objective_name in ("meanfield_elbo", "free_bits", "enum_elbo"):  # one draw: the term by hand
        pyro.set_rng_seed(0)
        z = poutine.trace(guide).get_trace(**batch).nodes["z"]["value"]  # the objective's draw (guide first)
        torch.testing.assert_close(term, 2.0 * bag_of_words_by_hand(model, z, batch).mean())


def test_the_bag_of_words_term_trains_the_guide_and_leaves_evaluation_alone(data):
    torch.manual_seed(0)
    model, guide = vae_pair(data, "dilated_cnn", bag_of_words_weight=1.0)
    batch = {**data.rows("train", 0, 16), "word_keep": 1.0}
    model.train(), guide.train()
    pyro.set_rng_seed(0)
    model_trace, _ = trace_pair(model, guide, batch, max_plate_nesting=1)
    assert model_trace.nodes["bag_of_words"]["infer"]["is_auxiliary"]  # Pyro's own mark, as pyro.factor's
    term = model_trace.nodes["bag_of_words"]["log_prob_sum"]
    gradients = torch.autograd.grad(term, [guide.head.weight, model.bag_of_words[0].weight])
    assert all(bool(g.abs().sum() > 0) for g in gradients)  # z must carry the words: the guide learns from it
    model.eval()
    pyro.set_rng_seed(0)
    model_trace, _ = trace_pair(model, guide, batch, max_plate_nesting=1)
    assert "bag_of_words" not in model_trace.nodes
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=rf"bag_of_words_weight = {bad} is not allowed: it must be a finite number >= 0"):
            SentenceVAEConfig(bag_of_words_weight=bad)


def test_a_fit_with_the_bag_of_words_term_puts_the_words_into_z(data):
    # Trained with the term, z predicts the training sentences' words far better than a run without
    # it, whose f_bow is never trained (both read through the same f_bow head after training).
    scores = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        model, guide = vae_pair(data, "dilated_cnn", bag_of_words_weight=5.0)
        model.config.bag_of_words_weight = weight  # 0: built with a head, trained without the term
        config = TrainConfig(epochs=8, batch_size=16, device="cpu", lr=1e-2)
        result = fit(model, guide, build_objective("meanfield_elbo"), data, config, progress=False)
        assert ("train/auxiliary/bag_of_words" in result.state.history[-1]) == (weight > 0)
        assert not any("auxiliary" in key for key in result.state.history[-1] if key.startswith("valid"))
        batch = data.rows("train", 0, 48)
        with torch.no_grad():
            z = poutine.trace(guide).get_trace(**batch).nodes["z"]["value"]
            scores[weight] = float(bag_of_words_by_hand(model, z, batch).mean())
    assert scores[5.0] > scores[0.0] + 1.0, scores


def test_the_bag_of_words_term_is_captured_by_the_compiled_step(data):
    from tests.test_compiled_step import assert_same, eager_and_compiled

    torch.manual_seed(0)
    model, guide = vae_pair(data, "dilated_cnn", bag_of_words_weight=1.0)
    batch = {**data.rows("train", 0, 16), "word_keep": 1.0}
    objective = build_objective("free_bits", threshold=0.5, objective="meanfield_elbo")
    pyro.enable_validation(False)  # as the fit loop captures
    try:
        results, step, messages = eager_and_compiled(model, guide, objective, batch, beta=0.5)
    finally:
        pyro.enable_validation(True)
    assert step.active and step.graphs, messages
    assert "auxiliary/bag_of_words" in results[1][1]
    assert_same(results)


# --- configuration errors ------------------------------------------------------------------------


def test_bad_settings_are_refused_in_one_line(data):
    with pytest.raises(ValueError, match=r"decoder = 'gru' is not allowed: choose one of lstm, dilated_cnn"):
        SentenceVAEConfig(decoder="gru")
    with pytest.raises(ValueError, match=r"z_every_step = false needs decoder = 'lstm'"):
        SentenceVAEConfig(decoder="dilated_cnn", z_every_step=False)
    with pytest.raises(ValueError, match=r"dilations = \[1, 0\] is not allowed"):
        SentenceVAEConfig(dilations=[1, 0])
    with pytest.raises(ValueError, match=r"kernel_size = 1 is not allowed"):
        LanguageModelConfig(kernel_size=1)
    images = DataSpec("pixels", (12,), "binary")
    with pytest.raises(ValueError, match=r"SentenceVAE needs word ids \(support 'categorical'.*data set 'pixels' has support 'binary'"):
        SentenceVAE(SentenceVAEConfig(), images)
    with pytest.raises(ValueError, match=r"condition_on_label = true needs integer labels \(num_classes\); data set 'sequences'"):
        LanguageModel(LanguageModelConfig(condition_on_label=True), data.spec)
    lm, _ = lm_pair(data)
    with pytest.raises(ValueError, match=r"sentence_lstm guides one vector latent 'z'; LanguageModel declares \[\]"):
        SentenceLSTMGuide(SentenceLSTMGuideConfig(), data.spec, lm)
    model, _ = vae_pair(data)
    with pytest.raises(ValueError, match=r"share_embedding = true reads the model's embedding of width 8, but embedding_dim = 128"):
        SentenceLSTMGuide(SentenceLSTMGuideConfig(share_embedding=True), data.spec, model)
    with pytest.raises(ValueError, match=r"SentenceVAE decodes z of shape \(\.\.\., 4\); got \(3, 5\)"):
        model.decoder_context(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"LanguageModel has no latent z"):
        lm.decoder_context(torch.zeros(3, 4))
