"""The compiled step (pyrovae.train.compiled, train.compile): the same loss, metrics and gradients
as the eager step on the same draws, for every objective family; a fallback with a message where a
pair cannot be captured; and a whole run that ends where the eager run ends."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.experiment import Experiment
from pyrovae.handlers import kl_scale
from pyrovae.objectives import ELBO, IWAE, EnumELBO, MeanFieldELBO
from pyrovae.pair import DataSpec, Model
from pyrovae.train.compiled import MAX_SIGNATURES, CompiledStep
from tests.conftest import tiny_experiment, tiny_pair
from tests.test_m2 import mixed_batch, tiny_m2


@pytest.fixture(autouse=True)
def no_validation():
    # The fit loop captures after its validated first step, with validation off.
    pyro.enable_validation(False)
    yield
    pyro.enable_validation(True)


def eager_and_compiled(model, guide, objective, batch, beta=1.0, by_site=None, mode="trace", seed=5):
    """Loss, metrics and gradients of the eager step and of the compiled step, each from the same
    random state. The compiled step runs twice: its first call is checked internally, so the
    second (a plain replay) is the one compared."""
    by_site = by_site or {}
    parameters = [p for module in (model, guide) for p in module.parameters()]
    messages = []
    step = CompiledStep(mode, model, guide, objective, say=messages.append)
    step(batch, beta, by_site)  # first sight: eager
    assert not step.graphs
    step(batch, beta, by_site)  # capture and checked first replay
    results = []
    for run in ("eager", "compiled"):
        torch.manual_seed(seed)
        if run == "eager":
            with kl_scale(by_site, default=beta) if by_site else kl_scale(beta):
                loss, metrics = objective(model, guide, batch)
        else:
            loss, metrics = step(batch, beta, by_site)
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        results.append((loss.detach(), metrics, gradients))
    return results, step, messages


def assert_same(results):
    (eager_loss, eager_metrics, eager_grads), (loss, metrics, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert set(metrics) == set(eager_metrics)
    for key in eager_metrics:
        torch.testing.assert_close(metrics[key], eager_metrics[key], rtol=1e-5, atol=1e-5, msg=key)
    for expected, got in zip(eager_grads, grads):
        if expected is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "objective",
    [ELBO(), MeanFieldELBO(), ELBO(particles=3), IWAE(5), IWAE(5, dreg=True)],
    ids=["elbo", "meanfield", "elbo_3_particles", "iwae_5", "iwae_5_dreg"],
)
def test_compiled_step_equals_the_eager_step_on_the_same_draws(binary_batch, objective):
    torch.manual_seed(0)
    model, guide = tiny_pair()
    objective(model, guide, binary_batch)
    results, step, messages = eager_and_compiled(model, guide, objective, binary_batch, beta=0.3)
    assert_same(results)
    if getattr(objective, "dreg", False):
        # DReG's gradient rescaling is a torch.autograd.Function whose backward a captured graph
        # cannot hold: the check on the first replay sees it and the step runs eagerly.
        assert not step.active and "disagrees with the eager one" in messages[0]
    else:
        assert step.active, messages
        assert len(step.graphs) == 1


def test_annealing_changes_no_capture_and_per_site_weights_are_inputs(binary_batch):
    torch.manual_seed(0)
    model, guide = tiny_pair()
    objective = ELBO()
    objective(model, guide, binary_batch)
    step = CompiledStep("trace", model, guide, objective, say=print)
    losses = []
    for beta in (0.0, 0.5, 1.0):
        torch.manual_seed(1)
        losses.append(float(step(binary_batch, beta, {})[0]))
        torch.manual_seed(1)
        with kl_scale(beta):
            expected = float(objective(model, guide, binary_batch)[0])
        assert losses[-1] == pytest.approx(expected, rel=1e-5)
    assert len(step.graphs) == 1 and step.active
    assert losses[0] != losses[1] != losses[2]
    # A per-site weight: one new signature (which sites are weighted), then values as inputs.
    results, step, _ = eager_and_compiled(model, guide, objective, binary_batch, beta=1.0, by_site={"z": 0.25})
    assert_same(results)
    assert step.active


def test_enumerated_m2_step_is_captured_and_equal():
    model, guide = tiny_m2(alpha=2.0)
    model.train()
    guide.train()
    batch = mixed_batch()
    objective = EnumELBO()
    objective(model, guide, batch)
    results, step, messages = eager_and_compiled(model, guide, objective, batch, beta=0.7)
    assert step.active, messages
    assert_same(results)
    # the classification factor (training mode) is part of the captured loss
    assert float(results[1][1]["elbo"]) != float(results[1][0])


def test_m2_with_a_convolutional_shifted_classifier_is_captured_and_equal():
    """The random shifts of the classification term are graph operations: each replay draws the
    eager step's shifts from the same random state."""
    from pyrovae.guides import M2Guide, M2GuideConfig
    from pyrovae.models import M2, M2Config
    from pyrovae.pair import DataSpec

    spec = DataSpec("tiny_images", (36,), "binary", image_shape=(6, 6), num_classes=3)
    torch.manual_seed(0)
    config = M2Config(latent_dim=2, hidden=[8], classifier_hidden=[8], classifier_channels=[4], classifier_shift=1, alpha=2.0)
    model = M2(config, spec)
    guide = M2Guide(M2GuideConfig(hidden=[8]), spec, model)
    batch = {"x": torch.bernoulli(torch.full((5, 36), 0.3)), "y": torch.tensor([0, 1, 2, 0, 1]),
             "y_mask": torch.tensor([True, False, True, True, False])}
    results, step, messages = eager_and_compiled(model, guide, EnumELBO(), batch)
    assert step.active, messages
    assert_same(results)
    # another random state, other shifts: the classification term (and so the loss) moves
    torch.manual_seed(6)
    assert float(step(batch, 1.0, {})[0]) != float(results[1][0])


class BranchOnData(Model):
    """A model whose Python control flow reads a tensor's value: it cannot be captured."""

    def __init__(self, data):
        super().__init__(data)
        self.decoder = torch.nn.Linear(3, data.x_features)

    @property
    def latent_sites(self):
        from pyrovae.pair import LatentSite

        return (LatentSite("z", (3,)),)

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 3), 1.0).to_event(1))
            logits = self.decoder(z)
            if x.sum() > 0:  # reads the batch's values
                logits = logits + 1.0
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def test_a_model_branching_on_values_runs_eagerly_with_a_message(binary_batch):
    from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig

    spec = DataSpec("tiny", (12,), "binary")
    torch.manual_seed(0)
    model = BranchOnData(spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[8]), spec, model)
    objective = ELBO()
    objective(model, guide, binary_batch)
    messages = []
    step = CompiledStep("trace", model, guide, objective, say=messages.append)
    step(binary_batch, 1.0, {})
    torch.manual_seed(2)
    loss, _ = step(binary_batch, 1.0, {})
    torch.manual_seed(2)
    expected, _ = objective(model, guide, binary_batch)
    assert not step.active
    assert "reads a tensor's value in Python control flow" in messages[0]
    assert float(loss) == pytest.approx(float(expected))


def test_too_many_batch_shapes_fall_back(binary_batch):
    torch.manual_seed(0)
    model, guide = tiny_pair()
    objective = ELBO()
    objective(model, guide, binary_batch)
    messages = []
    step = CompiledStep("trace", model, guide, objective, say=messages.append)
    for rows in range(2, MAX_SIGNATURES + 4):
        step({"x": binary_batch["x"][:rows]}, 1.0, {})
        step({"x": binary_batch["x"][:rows]}, 1.0, {})
    assert not step.active and "distinct signatures" in messages[-1]


def test_a_run_with_the_compiled_step_ends_where_the_eager_run_ends(tmp_path):
    """Two epochs of the digits VAE with KL annealing (and its last, partial batch: two
    signatures), once eager and once traced, from the same seed: the same parameters."""
    runs = {}
    for mode in ("none", "trace"):
        config = tiny_experiment(train={"epochs": 2, "compile": mode}, anneal={"name": "linear", "warmup_steps": 10})
        experiment = Experiment.from_config(config)
        experiment.train(tmp_path / mode, progress=False)
        runs[mode] = experiment
    for part in ("model", "guide"):
        eager = getattr(runs["none"], part).state_dict()
        traced = getattr(runs["trace"], part).state_dict()
        for name, tensor in eager.items():
            torch.testing.assert_close(traced[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")


def test_compile_setting_is_checked():
    from pyrovae.train import TrainConfig

    with pytest.raises(ValueError, match="train.compile = 'jit' is not allowed"):
        TrainConfig(compile="jit")


def test_torch_compile_mode_equals_the_eager_step(binary_batch):
    """``"torch"``: the same captured graph through torch.compile (Inductor)."""
    torch.manual_seed(0)
    model, guide = tiny_pair()
    objective = ELBO()
    objective(model, guide, binary_batch)
    results, step, messages = eager_and_compiled(model, guide, objective, binary_batch, beta=0.5, mode="torch")
    assert step.active, messages
    assert_same(results)


def test_batch_norm_running_statistics_are_updated_by_the_replay(binary_batch):
    """Buffers are graph inputs, and their in-place updates are operations of the graph: the
    replayed step moves the running statistics exactly as the eager step does."""
    torch.manual_seed(0)
    model, guide = tiny_pair(batch_norm=True)
    model.train()
    guide.train()
    objective = ELBO()
    objective(model, guide, binary_batch)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms
    step = CompiledStep("trace", model, guide, objective, say=print)
    start = norms[0].running_mean.clone()
    step(binary_batch, 1.0, {})  # first sight: eager
    start = norms[0].running_mean.clone()
    torch.manual_seed(4)
    step(binary_batch, 1.0, {})  # capture: the checked first replay moves the statistics once
    assert step.active
    captured = norms[0].running_mean.clone()
    norms[0].running_mean.copy_(start)
    torch.manual_seed(4)
    objective(model, guide, binary_batch)
    torch.testing.assert_close(captured, norms[0].running_mean)
    before = [m.running_mean.clone() for m in norms]
    torch.manual_seed(3)
    step(binary_batch, 1.0, {})
    replayed = [m.running_mean.clone() for m in norms]
    for m, saved in zip(norms, before):
        m.running_mean.copy_(saved)
    torch.manual_seed(3)
    objective(model, guide, binary_batch)
    for m, got, old in zip(norms, replayed, before):
        assert not torch.equal(got, old)
        torch.testing.assert_close(got, m.running_mean)


def test_pyro_objectives_stay_eager_with_a_message(binary_batch):
    from pyrovae.objectives.pyro_elbo import PyroELBO

    model, guide = tiny_pair()
    messages = []
    step = CompiledStep("trace", model, guide, PyroELBO(), say=messages.append)
    assert not step.active and "keeps state across calls" in messages[0]


USER_FAMILIES = {
    "conditional_labels": {"model": {"name": "tests.families:ConditionalVAE"}, "guide": {"name": "tests.families:ConditionalGuide"}},
    "categorical_vimco": {
        "model": {"name": "tests.families:CategoricalVAE", "groups": 4, "categories": 5},
        "guide": {"name": "tests.families:CategoricalGuide"},
        "objective": {"name": "iwae", "particles": 4},
    },
    "two_layers_per_site_beta": {
        "model": {"name": "tests.families:TwoLayerVAE"},
        "guide": {"name": "tests.families:TwoLayerGuide"},
        "anneal": {"name": "linear", "warmup_steps": 10, "sites": {"z2": {"name": "linear", "warmup_steps": 60}}},
    },
    "masked_sequences": {
        "data": {"name": "tests.families:toy_sequences"},
        "model": {"name": "tests.families:GRUSequenceVAE"},
        "guide": {"name": "tests.families:GRUSequenceGuide"},
    },
    "gumbel_scheduled_temperature": {
        "model": {"name": "tests.families:GumbelSoftmaxVAE"},
        "guide": {"name": "tests.families:GumbelSoftmaxGuide"},
        "schedules": {"temperature": {"name": "exponential_decay", "rate": 0.02, "initial": 1.0, "minimum": 0.5}},
    },
}


@pytest.mark.parametrize("family", list(USER_FAMILIES))
def test_user_written_families_are_captured_and_equal(family):
    """The pairs of tests/families.py, written as users would (labels, score-function sites under
    IWAE, two latent layers with per-site beta, masked variable-length rows, a scheduled input)."""
    config = {"seed": 0, "data": {"name": "digits"}, "train": {"epochs": 1}, **USER_FAMILIES[family]}
    experiment = Experiment.from_config(config)
    schedules = experiment.schedules()
    model, guide, objective = experiment.model, experiment.guide, experiment.objective
    batch = next(experiment.data.batches("train", 64, shuffle=True))
    beta, by_site = schedules.betas(5)
    objective(model, guide, {**batch, **schedules.input_values(5)})
    results, step, messages = eager_and_compiled(model, guide, objective, {**batch, **schedules.input_values(5)}, beta, by_site)
    assert step.active, messages
    assert_same(results)
    if schedules.inputs:
        # a scheduled number is an input of the graph: new values, no new capture, same losses
        for at in (20, 40):
            moved = {**batch, **schedules.input_values(at)}
            step(moved, beta, by_site)  # a second sighting would capture a value-keyed signature
            torch.manual_seed(at)
            loss, _ = step(moved, beta, by_site)
            torch.manual_seed(at)
            with kl_scale(by_site, default=beta):
                expected, _ = objective(model, guide, moved)
            assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert len(step.graphs) == 1
