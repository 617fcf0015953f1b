"""``objective.name = "pyro:<Class>"``: Pyro's own ELBO classes, with pyrovae's metrics."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, TraceGraph_ELBO

from pyrovae.config import resolve_config
from pyrovae.errors import ConfigError, UnsupportedPairError
from pyrovae.objectives import ELBO, IWAE, build_objective
from tests.conftest import grads, tiny_pair, zero


def test_pyro_trace_elbo_metrics_are_ours_on_the_same_draws(binary_batch):
    """Loss and gradients equal Pyro's own: tests/test_objectives.py. Here: the metrics."""
    model, guide = tiny_pair()
    objective = build_objective("pyro:Trace_ELBO")
    objective.prepare(model, guide, binary_batch)
    pyro.set_rng_seed(1)
    _, metrics = objective(model, guide, binary_batch)
    pyro.set_rng_seed(1)
    _, native = ELBO(max_plate_nesting=1)(model, guide, binary_batch)
    for key in ("elbo", "reconstruction", "kl/z"):
        assert float(metrics[key]) == pytest.approx(float(native[key]), abs=1e-5), key


class ScoreFunctionPair(torch.nn.Module):
    """c ~ Bernoulli(0.5), x ~ N(2c, 1); q(c | x) = Bernoulli(sigmoid(a + b x)) with a decaying-average baseline."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.b = torch.nn.Parameter(torch.tensor(-0.2))

    def model(self, x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(2.0 * c, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", len(x)):
            pyro.sample(
                "c",
                dist.Bernoulli(torch.sigmoid(self.a + self.b * x)),
                infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}},
            )


def test_pyro_tracegraph_elbo_honours_baselines_as_pyro_does():
    pair = ScoreFunctionPair()
    x = torch.tensor([1.0, 0.0, 2.0, 1.5, -0.3])
    objective = build_objective("pyro:TraceGraph_ELBO")
    objective.prepare(pair.model, pair.guide, {"x": x})
    reference = TraceGraph_ELBO(max_plate_nesting=1)
    ours, theirs = [], []
    for step in range(3):  # the decaying average moves between steps: compare a few
        pyro.clear_param_store()
        pyro.set_rng_seed(step)
        loss, metrics = objective(pair.model, pair.guide, {"x": x})
        ours.append(torch.autograd.grad(loss, [pair.a, pair.b]))
        pyro.clear_param_store()
        pyro.set_rng_seed(step)
        value, surrogate = reference._loss_and_surrogate_loss(pair.model, pair.guide, (x,), {})
        theirs.append(torch.autograd.grad(surrogate / len(x), [pair.a, pair.b]))
        assert float(loss) == pytest.approx(-float(value) / len(x), abs=1e-5)
        assert float(metrics["elbo"]) == pytest.approx(float(value) / len(x), abs=1e-5)
    for mine, pyros in zip(ours, theirs):
        assert torch.allclose(torch.stack(mine), torch.stack(pyros), atol=1e-6)


def test_pyro_renyi_elbo_at_alpha_zero_has_the_iwae_gradient():
    """Renyi's alpha = 0 bound on one datapoint is the K-sample IWAE bound: same draws, same gradient."""
    model, guide = tiny_pair()
    batch = {"x": torch.bernoulli(torch.full((1, 12), 0.3), generator=torch.Generator().manual_seed(0))}
    renyi = build_objective("pyro:RenyiELBO", alpha=0.0, num_particles=4, vectorize_particles=True)
    renyi.prepare(model, guide, batch)
    assert renyi.selection_metric == "renyi"
    pyro.set_rng_seed(3)
    zero(model, guide)
    loss, metrics = renyi(model, guide, batch)
    loss.backward()  # adds nothing: the gradients were taken during the call
    ours = grads(model, guide)
    zero(model, guide)
    pyro.set_rng_seed(3)
    iwae_loss, iwae_metrics = IWAE(particles=4, max_plate_nesting=1)(model, guide, batch)
    iwae_loss.backward()
    assert float(metrics["renyi"]) == pytest.approx(float(iwae_metrics["iwae"]), abs=1e-5)
    assert torch.allclose(ours, grads(model, guide), atol=1e-5)
    with torch.no_grad():  # validation: the value without gradients
        _, evaluated = renyi(model, guide, batch)
    assert torch.isfinite(evaluated["renyi"])


def test_pyro_trace_enum_elbo_sums_out_and_other_classes_refuse_enumeration():
    def model(x, **_):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(torch.tensor([0.3, 0.7])), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(2.0 * y, 1.0), obs=x)

    def guide(x, **_):
        pass

    x = torch.tensor([0.1, 1.9, 2.5])
    loss, metrics = build_objective("pyro:TraceEnum_ELBO")(model, guide, {"x": x})
    assert float(loss) == pytest.approx(float(TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x)) / 3, abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(-float(loss), abs=1e-5)
    with pytest.raises(UnsupportedPairError, match="'pyro:Trace_ELBO' does not sum out the enumerated site 'y'"):
        build_objective("pyro:Trace_ELBO")(model, guide, {"x": x})


def test_names_and_options_are_checked_like_every_part():
    config = resolve_config(
        {"data": {"name": "digits"}, "model": {"name": "vae"}, "objective": {"name": "pyro:RenyiELBO", "alpha": 0.5, "num_particles": 2}}
    )
    assert config["objective"]["alpha"] == 0.5 and config["objective"]["num_particles"] == 2
    with pytest.raises(ConfigError, match="pyro.infer has no ELBO class 'TraceElbo'.*Trace_ELBO"):
        resolve_config({"data": {"name": "digits"}, "model": {"name": "vae"}, "objective": {"name": "pyro:TraceElbo"}})
    with pytest.raises(ConfigError, match="unknown key 'particles'.*num_particles"):
        resolve_config({"data": {"name": "digits"}, "model": {"name": "vae"}, "objective": {"name": "pyro:Trace_ELBO", "particles": 3}})


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
