"""``objective.name = "pyro:<Class>"``: Pyro's own ELBO classes, with pyrovae's metrics."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceTMC_ELBO, Trace_ELBO

from pyrovae.config import resolve_config
from pyrovae.errors import ConfigError, UnsupportedPairError
from pyrovae.handlers import kl_scale
from pyrovae.objectives import ELBO, IWAE, build_objective
from tests.conftest import grads, tiny_pair, zero

X = torch.tensor([-0.4, 1.3, 3.1, 2.2, 0.2])
X_MASK = torch.tensor([True, True, False, True, True])
PRIOR_MASK = torch.tensor([True, False, True, True, False])


def test_pyro_trace_elbo_gives_pyros_loss_gradients_and_our_metrics(binary_batch):
    model, guide = tiny_pair()
    n = binary_batch["x"].shape[0]
    objective = build_objective("pyro:Trace_ELBO")
    objective.prepare(model, guide, binary_batch)
    for beta in (1.0, 0.3):
        pyro.set_rng_seed(1)
        with kl_scale(beta):
            loss, metrics = objective(model, guide, binary_batch)
        loss.backward()
        ours = grads(model, guide)
        zero(model, guide)
        pyro.set_rng_seed(1)
        with kl_scale(beta):
            reference = Trace_ELBO().differentiable_loss(model, guide, **binary_batch) / n
        reference.backward()
        assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-5)
        assert torch.allclose(ours, grads(model, guide), atol=1e-6)
        zero(model, guide)
        # The metrics are pyrovae's own elbo's on the same draws (unannealed, whatever beta).
        pyro.set_rng_seed(1)
        _, native = ELBO(max_plate_nesting=1)(model, guide, binary_batch)
        for key in ("elbo", "reconstruction", "kl/z"):
            assert float(metrics[key]) == pytest.approx(float(native[key]), abs=1e-5), key


class ScoreFunctionPair(torch.nn.Module):
    """c ~ Bernoulli(0.5), x ~ N(2c, 1); q(c | x) = Bernoulli(sigmoid(a + b x)), with a baseline."""

    def __init__(self, baseline: str):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.2))
        self.baseline_kind = baseline
        self.baseline = Baseline()

    def model(self, x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)

    def guide(self, x):
        if self.baseline_kind == "decaying average":
            baseline = {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}
        elif self.baseline_kind == "network":
            baseline = {"nn_baseline": self.baseline, "nn_baseline_input": x}
        else:
            baseline = {}
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(torch.sigmoid(self.a + self.b * x)), infer={"baseline": baseline})


class Baseline(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.v = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, x):
        return self.w * x + self.v


def tracegraph_steps(pair, run, steps=4):
    """Gradients (a, b, baseline parameters) of ``steps`` consecutive steps sharing one param store
    (where the decaying average lives); ``run(step) -> loss per datapoint``."""
    pyro.clear_param_store()
    out = []
    for step in range(steps):
        pyro.set_rng_seed(step)
        loss = run(step)
        gradients = torch.autograd.grad(loss, list(pair.parameters()), allow_unused=True)
        out.append(torch.stack([torch.zeros(()) if g is None else g for g in gradients]))
    pyro.clear_param_store()
    return out


@pytest.mark.parametrize("baseline", ["decaying average", "network"])
def test_pyro_tracegraph_elbo_honours_baselines_as_pyro_does(baseline):
    pair = ScoreFunctionPair(baseline)
    batch = {"x": X}
    objective = build_objective("pyro:TraceGraph_ELBO")
    objective.prepare(pair.model, pair.guide, batch)
    values = []

    def ours(step):
        loss, metrics = objective(pair.model, pair.guide, batch)
        assert all(type(value) is torch.Tensor for value in metrics.values())  # no provenance tensors
        values.append((float(loss.detach()), float(metrics["elbo"])))
        return loss

    def pyros(step):
        value, surrogate = TraceGraph_ELBO(max_plate_nesting=1)._loss_and_surrogate_loss(pair.model, pair.guide, (X,), {})
        assert values[step][0] == pytest.approx(-float(value.detach()) / len(X), abs=1e-5)
        assert values[step][1] == pytest.approx(float(value.detach()) / len(X), abs=1e-5)
        return surrogate / len(X)

    def without_baseline(step):
        pair.baseline_kind = "none"
        try:
            return TraceGraph_ELBO(max_plate_nesting=1)._loss_and_surrogate_loss(pair.model, pair.guide, (X,), {})[1] / len(X)
        finally:
            pair.baseline_kind = baseline

    for mine, theirs in zip(tracegraph_steps(pair, ours), tracegraph_steps(pair, pyros)):
        assert torch.allclose(mine, theirs, atol=1e-6)
    # The baseline changes the guide's gradient (after the first step for the decaying average).
    assert not torch.allclose(tracegraph_steps(pair, ours)[-1][:2], tracegraph_steps(pair, without_baseline)[-1][:2], atol=1e-4)


class AnchoredGuide(torch.nn.Module):
    """Pyro's loss_and_grads takes gradients only if a trace has a param site: give it one."""

    def __init__(self, guide):
        super().__init__()
        self.inner = guide

    def forward(self, **batch):
        pyro.param("anchor", torch.zeros(()))
        return self.inner(**batch)


def test_pyro_renyi_elbo_gradients_are_pyros_per_datapoint():
    model, guide = tiny_pair()
    batch = {"x": torch.bernoulli(torch.full((6, 12), 0.3), generator=torch.Generator().manual_seed(0))}
    n = len(batch["x"])
    renyi = build_objective("pyro:RenyiELBO", alpha=0.5, num_particles=3, vectorize_particles=True)
    renyi.prepare(model, guide, batch)
    assert renyi.selection_metric == "renyi"
    pyro.set_rng_seed(3)
    zero(model, guide)
    loss, metrics = renyi(model, guide, batch)
    loss.backward()  # adds nothing: the gradients were taken during the call
    ours = grads(model, guide)
    zero(model, guide)
    pyro.set_rng_seed(3)
    value = RenyiELBO(alpha=0.5, num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss_and_grads(
        model, AnchoredGuide(guide), **batch
    )
    assert float(loss.detach()) == pytest.approx(value / n, abs=1e-5)
    assert float(metrics["renyi"]) == pytest.approx(-value / n, abs=1e-5)
    assert torch.allclose(ours, grads(model, guide) / n, atol=1e-6)
    zero(model, guide)
    with torch.no_grad():  # validation: the value, and no gradients
        _, evaluated = renyi(model, guide, batch)
    assert torch.isfinite(evaluated["renyi"])
    assert all(p.grad is None for m in (model, guide) for p in m.parameters())


def test_pyro_renyi_elbo_at_alpha_zero_is_the_iwae_bound_with_its_gradient():
    """Renyi's alpha = 0 bound is the K-sample IWAE bound per datapoint: same draws, same gradient."""
    model, guide = tiny_pair()
    batch = {"x": torch.bernoulli(torch.full((5, 12), 0.3), generator=torch.Generator().manual_seed(0))}
    renyi = build_objective("pyro:RenyiELBO", alpha=0.0, num_particles=4, vectorize_particles=True)
    renyi.prepare(model, guide, batch)
    pyro.set_rng_seed(3)
    zero(model, guide)
    loss, metrics = renyi(model, guide, batch)
    ours = grads(model, guide)
    zero(model, guide)
    pyro.set_rng_seed(3)
    iwae_loss, iwae_metrics = IWAE(particles=4, max_plate_nesting=1)(model, guide, batch)
    iwae_loss.backward()
    assert float(metrics["renyi"]) == pytest.approx(float(iwae_metrics["iwae"]), abs=1e-5)
    assert torch.allclose(ours, grads(model, guide), atol=1e-5)


@pytest.mark.parametrize(
    "name, options, particles",
    [
        ("Trace_ELBO", {}, 1),
        ("Trace_ELBO", {"num_particles": 2}, 2),
        ("TraceMeanField_ELBO", {}, 1),
        ("TraceGraph_ELBO", {}, 1),
        ("RenyiELBO", {"alpha": 0.5, "num_particles": 2, "vectorize_particles": True}, 2),
        ("TraceTMC_ELBO", {"strict_enumeration_warning": False}, 1),
    ],
)
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_metrics_equal_the_masked_terms_computed_by_hand(name, options, particles, beta):
    """z ~ N(0, 1) masked by Distribution.mask, x ~ N(z, 1) masked by poutine.mask, q(z | x) Normal:
    each metric equals the hand-computed masked Monte Carlo terms on the draws Pyro made, unannealed."""
    drawn = []
    loc = torch.nn.Parameter(torch.tensor(0.2))

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).mask(PRIOR_MASK))
            with poutine.mask(mask=X_MASK):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            drawn.append(pyro.sample("z", dist.Normal(loc + 0.5 * x, 0.8)))

    objective = build_objective(f"pyro:{name}", **options)
    objective.prepare(model, guide, {"x": X})
    drawn.clear()  # keep only the draws of the step
    with kl_scale(beta):
        loss, metrics = objective(model, guide, {"x": X})
    z = torch.stack(drawn).detach().reshape(particles, len(X))
    log_q = dist.Normal(loc.detach() + 0.5 * X, 0.8).log_prob(z)
    log_prior = dist.Normal(0.0, 1.0).log_prob(z) * PRIOR_MASK
    log_likelihood = dist.Normal(z, 1.0).log_prob(X) * X_MASK
    assert float(metrics["kl/z"]) == pytest.approx(float((log_q - log_prior).mean()), abs=1e-5)
    assert float(metrics["reconstruction"]) == pytest.approx(float(log_likelihood.mean()), abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(float((log_likelihood + log_prior - log_q).mean()), abs=1e-5)
    log_weights = log_likelihood + log_prior - log_q  # (particles, B)
    if name == "RenyiELBO":
        bound = (torch.logsumexp(0.5 * log_weights, 0) - math.log(particles)) / 0.5
        assert float(metrics["renyi"]) == pytest.approx(float(bound.mean()), abs=1e-5)
    if name == "TraceTMC_ELBO":
        assert float(metrics["tmc"]) == pytest.approx(float(log_weights.mean()), abs=1e-5)


def test_pyro_tmc_elbo_averages_its_metrics_over_multiple_draws_and_refuses_exhaustive_enumeration():
    drawn = {}
    loc = torch.nn.Parameter(torch.tensor(0.2))

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            drawn["z"] = pyro.sample("z", dist.Normal(loc + 0.5 * x, 0.8), infer={"enumerate": "parallel", "num_samples": 3})

    objective = build_objective("pyro:TraceTMC_ELBO")
    assert objective.selection_metric == "tmc"
    pyro.set_rng_seed(0)
    loss, metrics = objective(model, guide, {"x": X})
    (ours,) = torch.autograd.grad(loss, [loc])
    pyro.set_rng_seed(0)
    reference = TraceTMC_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, X) / len(X)
    (theirs,) = torch.autograd.grad(reference, [loc])
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-5) and torch.allclose(ours, theirs, atol=1e-6)
    z = drawn["z"].detach()  # (3, B): three draws per datapoint
    log_weights = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(X) - dist.Normal(loc.detach() + 0.5 * X, 0.8).log_prob(z)
    assert float(metrics["elbo"]) == pytest.approx(float(log_weights.mean()), abs=1e-5)
    assert float(metrics["tmc"]) == pytest.approx(float((torch.logsumexp(log_weights, 0) - math.log(3)).mean()), abs=1e-5)

    def exhaustive(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})

    def bernoulli_model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(pyro.sample("z", dist.Bernoulli(0.5)), 1.0), obs=x)

    with pytest.raises(UnsupportedPairError, match="site 'z' is enumerated exhaustively"):
        build_objective("pyro:TraceTMC_ELBO")(bernoulli_model, exhaustive, {"x": X})


def test_pyro_trace_enum_elbo_sums_out_and_other_classes_refuse_enumeration():
    def model(x, **_):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(torch.tensor([0.3, 0.7])), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(2.0 * y, 1.0), obs=x)

    def guide(x, **_):
        pass

    x = torch.tensor([0.1, 1.9, 2.5])
    loss, metrics = build_objective("pyro:TraceEnum_ELBO")(model, guide, {"x": x})
    assert float(loss.detach()) == pytest.approx(float(TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x)) / 3, abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(-float(loss.detach()), abs=1e-5)
    for name in ("Trace_ELBO", "TraceGraph_ELBO", "RenyiELBO"):
        with pytest.raises(UnsupportedPairError, match=f"'pyro:{name}' does not sum out the enumerated site 'y'"):
            build_objective(f"pyro:{name}")(model, guide, {"x": x})


def test_pyro_trace_enum_elbo_is_enum_elbo_with_pyros_options():
    """Sequential particles (Pyro's default, vectorize_particles = false): Pyro's loss and gradients."""
    from tests.test_enum_elbo import BATCH, Pair

    pair = Pair()
    objective = build_objective("pyro:TraceEnum_ELBO", num_particles=2)
    objective.prepare(pair.model, pair.guide, BATCH)
    pyro.set_rng_seed(5)
    loss, metrics = objective(pair.model, pair.guide, BATCH)
    loss.backward()
    ours = grads(pair)
    zero(pair)
    pyro.set_rng_seed(5)
    reference = TraceEnum_ELBO(num_particles=2, max_plate_nesting=1).differentiable_loss(pair.model, pair.guide, **BATCH) / 5
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(-float(reference.detach()), abs=1e-5)
    assert torch.allclose(ours, grads(pair), atol=1e-5)


DIGITS_VAE = {"data": {"name": "digits"}, "model": {"name": "vae"}}


def test_names_and_options_are_checked_like_every_part():
    config = resolve_config({**DIGITS_VAE, "objective": {"name": "pyro:RenyiELBO", "alpha": 0.5, "num_particles": 2}})
    assert config["objective"]["alpha"] == 0.5 and config["objective"]["num_particles"] == 2
    assert config["objective"]["max_plate_nesting"] is None  # pyrovae finds it
    assert resolve_config({**DIGITS_VAE, "objective": {"name": "pyro:RenyiELBO", "alpha": 0}})["objective"]["alpha"] == 0.0
    bad = [
        ({"name": "pyro:TraceElbo"}, r"pyro.infer has no ELBO class 'TraceElbo'; choose one of: .*Trace_ELBO"),
        ({"name": "pyro:Trace_ELBO", "particles": 3}, r"unknown key 'particles'.*num_particles"),
        ({"name": "pyro:RenyiELBO", "alpha": "half"}, r"alpha = 'half': expected a number"),
        ({"name": "pyro:Trace_ELBO", "num_particles": 1.5}, r"num_particles = 1.5: expected an integer"),
        ({"name": "pyro:Trace_ELBO", "vectorize_particles": 1}, r"vectorize_particles = 1: expected true or false"),
        ({"name": "pyro:JitTrace_ELBO"}, r"JitTrace_ELBO compiles with torch.jit.*use 'pyro:Trace_ELBO'"),
        ({"name": "pyro:ReweightedWakeSleep"}, r"ReweightedWakeSleep returns two losses"),
        ({"name": "pyro:poutine"}, r"pyro.infer has no ELBO class 'poutine'"),
    ]
    for objective, message in bad:
        with pytest.raises(ConfigError, match=message):
            resolve_config({**DIGITS_VAE, "objective": objective})
    # The resolved options build the objective.
    objective = build_objective(config["objective"].pop("name"), **config["objective"])
    assert objective.name == "pyro:RenyiELBO"


@pytest.mark.parametrize(
    "objective",
    [
        {"name": "pyro:TraceGraph_ELBO"},
        {"name": "pyro:RenyiELBO", "alpha": 0.5, "num_particles": 3, "vectorize_particles": True},
    ],
    ids=["tracegraph", "renyi"],
)
def test_pyro_objectives_train_through_the_fit_loop(tmp_path, objective):
    from pyrovae.experiment import Experiment
    from tests.conftest import tiny_experiment

    experiment = Experiment.from_config(tiny_experiment(objective=objective, train={"epochs": 2}))
    before = [p.detach().clone() for p in experiment.guide.parameters()]
    final = experiment.train(tmp_path / "run", progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, experiment.guide.parameters()))
    metric = experiment.objective.selection_metric
    assert torch.isfinite(torch.tensor(final[f"test_{metric}"]))
