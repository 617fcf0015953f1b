"""The declared model ``[model] name = "graph"``: a TOML graph of sites compiled to a Model whose
log-densities equal the hand-written models', its one-line refusals, particle and enumeration dims,
the TOML round trip of ``[[model.site]]`` tables, and a short end-to-end run."""

import json
import math
import tomllib
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.nn import functional as F

from pyrovae.cli import main
from pyrovae.config import dump_toml, load_experiment, resolve_config
from pyrovae.errors import ConfigError, DataError, PairMismatchError
from pyrovae.experiment import Experiment
from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.models import GaussianVAE, GaussianVAEConfig, LabelConditionedVAE, LabelConditionedVAEConfig, LadderVAE, LadderVAEConfig
from pyrovae.models.graph import GraphModel, GraphModelConfig
from pyrovae.pair import DataSpec, check_pair
from pyrovae.registry import GUIDES
from pyrovae.traces import trace_pair
from tests.conftest import train_with_the_cli, tiny_experiment

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SPEC = DataSpec("tiny", (12,), "binary", num_classes=3)


def normal_root(name="z", size=3):
    return {"name": name, "distribution": "Normal", "shape": [size], "params": {"loc": 0.0, "scale": 1.0}}


def bernoulli_x(parents=("z",), hidden=(16,)):
    return {"name": "x", "distribution": "Bernoulli", "parents": list(parents), "hidden": list(hidden), "observed": "x"}


def graph(*sites, spec=SPEC, **options):
    return GraphModel(GraphModelConfig(site=[dict(site) for site in sites], **options), spec)


def batch_of(rows=5, spec=SPEC, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = {"x": torch.bernoulli(torch.full((rows,) + spec.x_shape, 0.3), generator=generator)}
    if spec.num_classes:
        batch["y"] = torch.randint(0, spec.num_classes, (rows,), generator=generator)
    return batch


def log_joint(model, batch, values, particles=None):
    """log p(x, z) of ``model`` at the latent ``values``, optionally under a particle plate."""
    conditioned = poutine.condition(model, data=values)
    if particles is not None:
        conditioned = pyro.plate("particles", particles, dim=-2)(conditioned)
    trace = poutine.trace(conditioned).get_trace(**batch)
    return trace.log_prob_sum(), trace


def refusal(*sites, spec=SPEC, **options) -> str:
    with pytest.raises(ValueError) as caught:
        graph(*sites, spec=spec, **options)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- equal to the hand-written models ---------------------------------------------------------


@pytest.mark.parametrize("particles", [None, 4])
def test_gaussian_vae_graph_equals_gaussian_vae(particles):
    torch.manual_seed(0)
    model = graph(normal_root(), bernoulli_x())
    vae = GaussianVAE(GaussianVAEConfig(latent_dim=3, hidden=[16]), SPEC)
    vae.decoder.load_state_dict(model.networks["x"].state_dict())
    batch = batch_of()
    z = torch.randn(((particles,) if particles else ()) + (5, 3))
    ours, trace = log_joint(model, batch, {"z": z}, particles)
    theirs, _ = log_joint(vae, batch, {"z": z}, particles)
    assert torch.allclose(ours, theirs)
    assert tuple(trace.nodes["x"]["fn"].batch_shape) == ((particles, 5) if particles else (5,))
    assert tuple(trace.nodes["x"]["fn"].event_shape) == (12,)
    assert model.latent_sites == vae.latent_sites
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in vae.parameters())


def test_two_layer_graph_equals_ladder_vae_with_batch_norm():
    torch.manual_seed(0)
    layer = {"activation": "leaky_relu", "batch_norm": True}
    model = graph(
        normal_root("z2", 2),
        {"name": "z1", "distribution": "Normal", "shape": [4], "parents": ["z2"], "hidden": [8], **layer},
        {**bernoulli_x(("z1",), (16,)), **layer},
    )
    ladder = LadderVAE(LadderVAEConfig(latent_dims=[4, 2], hidden=[[16], [8]], batch_norm=True), SPEC)
    ladder.decoder.load_state_dict(model.networks["x"].state_dict())
    ladder.top_down[0].load_state_dict(model.networks["z1"].state_dict())
    model.eval(), ladder.eval()
    batch, values = batch_of(), {"z2": torch.randn(3, 5, 2), "z1": torch.randn(3, 5, 4)}
    ours, trace = log_joint(model, batch, values, particles=3)
    theirs, _ = log_joint(ladder, batch, values, particles=3)
    assert torch.allclose(ours, theirs)
    assert [site.name for site in model.latent_sites] == [site.name for site in ladder.latent_sites] == ["z2", "z1"]


def test_label_conditioned_graph_equals_label_cvae():
    torch.manual_seed(0)
    model = graph(normal_root(), bernoulli_x(("z", "y")))
    cvae = LabelConditionedVAE(LabelConditionedVAEConfig(latent_dim=3, hidden=[16], activation="tanh"), SPEC)
    cvae.decoder.load_state_dict(model.networks["x"].state_dict())
    batch, z = batch_of(), torch.randn(2, 5, 3)
    assert torch.allclose(log_joint(model, batch, {"z": z}, 2)[0], log_joint(cvae, batch, {"z": z}, 2)[0])


def test_beta_latents_and_a_gamma_child_match_pyro_written_by_hand():
    """Root Beta(1, 1)^D; a Gamma site whose concentration and rate are softplus(net) + min_scale."""
    torch.manual_seed(0)
    model = graph(
        {"name": "z", "distribution": "Beta", "shape": [3], "params": {"concentration1": 1.0, "concentration0": 1.0}},
        {"name": "g", "distribution": "Gamma", "shape": [2], "parents": ["z"], "hidden": [5], "min_scale": 0.01},
        bernoulli_x(("z", "g")),
    )
    network, decoder = model.networks["g"], model.networks["x"]

    def by_hand(x, **batch):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Beta(torch.ones(3), torch.ones(3)).to_event(1))
            concentration, rate = (F.softplus(network(z)) + 0.01).split([2, 2], -1)
            g = pyro.sample("g", dist.Gamma(concentration, rate).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(torch.cat([z, g], -1))).to_event(1), obs=x)

    batch = batch_of()
    values = {"z": torch.rand(5, 3), "g": torch.rand(5, 2) + 0.5}
    ours, trace = log_joint(model, batch, values)
    theirs, _ = log_joint(by_hand, batch, values)
    assert torch.allclose(ours, theirs)
    assert tuple(trace.nodes["g"]["fn"].event_shape) == (2,)
    assert model.latent_sites[0].name == "z" and not model.latent_sites[0].discrete
    # diag_normal's real-valued draws do not fit a Beta's (0, 1): the pair check says so.
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=[8]), SPEC, model)
    with pytest.raises(PairMismatchError, match="support"):
        check_pair(model, guide, batch)


def test_categorical_and_dirichlet_sites_with_networks_and_a_fixed_scale():
    model = graph(
        {"name": "c", "distribution": "Categorical", "categories": 4, "shape": [], "params": {"logits": 0.0}},
        {"name": "p", "distribution": "Dirichlet", "shape": [3], "parents": ["c"]},
        {"name": "x", "distribution": "Normal", "parents": ["c", "p"], "params": {"scale": 0.5}, "observed": "x"},
        spec=DataSpec("real", (6,), "real"),
    )
    assert model.networks["p"].in_features == 4 and model.networks["x"].in_features == 7
    assert model.networks["x"].out_features == 6  # loc only: the scale is fixed
    batch = {"x": torch.randn(5, 6)}
    trace = poutine.trace(model).get_trace(**batch)
    assert trace.nodes["c"]["value"].shape == (5,) and trace.nodes["p"]["value"].shape == (5, 3)
    assert torch.allclose(trace.nodes["c"]["fn"].probs, torch.full((5, 4), 0.25))
    loc = model.networks["x"](torch.cat([F.one_hot(trace.nodes["c"]["value"], 4).float(), trace.nodes["p"]["value"]], -1))
    trace.compute_log_prob()
    assert torch.allclose(trace.nodes["x"]["log_prob"], dist.Normal(loc, 0.5).log_prob(batch["x"]).sum(-1), atol=1e-5)
    discrete = {site.name: site.discrete for site in model.latent_sites}
    assert discrete == {"c": True, "p": False}


def test_learned_root_parameters_start_at_params_and_get_gradients():
    model = graph(
        {"name": "z", "distribution": "Normal", "shape": [3], "params": {"loc": [0.0, 1.0, 2.0], "scale": 2.0}, "learn": True},
        bernoulli_x(),
    )
    batch = batch_of()
    trace = poutine.trace(model).get_trace(**batch)
    fn = trace.nodes["z"]["fn"].base_dist
    assert torch.allclose(fn.loc[0], torch.tensor([0.0, 1.0, 2.0])) and torch.allclose(fn.scale, torch.tensor(2.0))
    trace.log_prob_sum().backward()
    learned = dict(model.site_params["z"].named_parameters())
    assert set(learned) == {"loc", "scale"} and all(p.grad is not None for p in learned.values())


# --- enumeration and masks --------------------------------------------------------------------


M2_SITES = (
    {"name": "y", "distribution": "Categorical", "params": {"logits": [0.0, 1.0, -1.0]}, "observed": "y", "mask": "y_mask", "enumerate": True},
    normal_root(),
    bernoulli_x(("y", "z")),
)


def delta_guide(z):
    def guide(x, **batch):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(z).to_event(1))

    return guide


def test_an_enumerated_partly_observed_label_equals_m2_written_by_hand():
    torch.manual_seed(0)
    model = graph(*M2_SITES)
    assert model.latent_sites[0].name == "y_unobserved" and model.latent_sites[0].enumerated and model.latent_sites[0].discrete
    decoder, prior = model.networks["x"], torch.tensor([0.0, 1.0, -1.0])

    def by_hand(x, y, y_mask, **batch):
        with pyro.plate("data", x.shape[0]):
            with poutine.infer_config(config_fn=lambda site: {"enumerate": "parallel"} if site["name"] == "y_unobserved" else {}):
                label = pyro.sample("y", dist.Categorical(logits=prior), obs=y, obs_mask=y_mask)
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            onehot = F.one_hot(label, 3).float()
            lead = torch.broadcast_shapes(z.shape[:-1], onehot.shape[:-1])
            features = torch.cat([onehot.expand(lead + (3,)), z.expand(lead + (3,))], -1)
            pyro.sample("x", dist.Bernoulli(logits=decoder(features)).to_event(1), obs=x)

    batch = batch_of(6)
    batch["y_mask"] = torch.tensor([True, False, True, False, False, True])
    guide = delta_guide(torch.randn(6, 3))
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    ours = elbo.differentiable_loss(model, guide, **batch)
    theirs = elbo.differentiable_loss(by_hand, guide, **batch)
    assert torch.allclose(ours, theirs)
    # The loss is -sum_n [log p(z_n) + log p(y_n) p(x_n | y_n, z_n)] where y_n is observed, with
    # log sum_y p(y) p(x_n | y, z_n) where it is hidden.
    z = torch.randn(6, 3)
    loss = elbo.differentiable_loss(model, delta_guide(z), **batch)
    log_prior = prior.log_softmax(-1).unsqueeze(-1)
    per_label = torch.stack(
        [dist.Bernoulli(logits=decoder(torch.cat([F.one_hot(torch.full((6,), k), 3).float(), z], -1))).log_prob(batch["x"]).sum(-1) for k in range(3)]
    ) + log_prior
    observed = per_label.gather(0, batch["y"].unsqueeze(0))[0]
    expected = torch.where(batch["y_mask"], observed, per_label.logsumexp(0)) + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(loss, -expected.sum(), atol=1e-4)


def test_particles_and_enumeration_dims_broadcast_before_concatenating():
    model = graph(*M2_SITES)
    batch = batch_of(5)
    batch["y_mask"] = torch.tensor([True, False, True, False, False])
    guide = delta_guide(torch.randn(5, 3))
    model_trace, _ = trace_pair(model, guide, batch, max_plate_nesting=1, particles=4, enumerate=True)
    unobserved = model_trace.nodes["y_unobserved"]["value"]
    assert unobserved.shape == (3, 1, 1)  # the enumeration dim, left of the particle and data dims
    assert tuple(model_trace.nodes["x"]["fn"].batch_shape) == (3, 4, 5)
    assert model_trace.nodes["y"]["value"].shape == (3, 1, 5)  # observed labels where y_mask, else each value


def test_an_enumerated_latent_child_of_a_latent_under_particles():
    model = graph(
        normal_root(),
        {"name": "b", "distribution": "Bernoulli", "shape": [], "parents": ["z"], "enumerate": True},
        bernoulli_x(("z", "b")),
    )
    guide = delta_guide(torch.randn(5, 3))
    model_trace, _ = trace_pair(model, guide, batch_of(5), max_plate_nesting=1, particles=2, enumerate=True)
    assert model_trace.nodes["b"]["value"].shape == (2, 1, 1)  # enumeration, particle, data dims
    assert tuple(model_trace.nodes["x"]["fn"].batch_shape) == (2, 2, 5)


# --- refusals, each in one line ----------------------------------------------------------------


def test_refusals_name_the_site_and_the_problem():
    x = bernoulli_x()
    assert "cycle: a -> b -> a" in refusal(
        {"name": "a", "distribution": "Normal", "shape": [2], "parents": ["b"]},
        {"name": "b", "distribution": "Normal", "shape": [2], "parents": ["a"]},
        bernoulli_x(("a",)),
    )
    assert "cycle: z -> z" in refusal({**normal_root(), "parents": ["z"], "params": {}}, x)
    message = refusal(normal_root(), bernoulli_x(("w",)))
    assert "site 'x': unknown parent 'w'" in message and "batch_keys" in message
    assert "unknown parent 'zz' (did you mean 'z'?)" in refusal(normal_root(), bernoulli_x(("zz",)))
    assert "unknown parent 'y'" in refusal(normal_root(), bernoulli_x(("z", "y")), spec=DataSpec("plain", (12,), "binary"))
    assert "observes batch['x'] of shape [12]" in refusal(normal_root(), {**x, "shape": [784]})
    assert "a Dirichlet value has 1 dim(s) of its own (support simplex), so shape needs at least 1, got []" in refusal(
        {"name": "p", "distribution": "Dirichlet", "shape": [], "params": {"concentration": 1.0}}, bernoulli_x(("p",))
    )
    assert "unknown distribution 'Normall'; closest: Normal" in refusal({**normal_root(), "distribution": "Normall"}, x)
    assert "root site (no parents), so it needs fixed params" in refusal({**normal_root(), "params": {}}, x)
    assert "site 'z' is declared twice" in refusal(normal_root(), normal_root(), x)
    assert "'y_unobserved' is already taken by site 'y_unobserved'" in refusal(
        normal_root("y_unobserved"), M2_SITES[0], {**x, "parents": ["y_unobserved"]}
    )
    assert "no site is observed" in refusal(normal_root())
    assert "unknown key 'hiden' (did you mean 'hidden'?)" in refusal(normal_root(), {**x, "hiden": [3]})
    assert "enumerate = true needs a discrete" in refusal({**normal_root(), "enumerate": True}, x)
    assert "mask = 'y_mask' needs observed" in refusal({**normal_root(), "mask": "y_mask"}, x)
    assert "say how many values it takes: categories = N" in refusal(
        {"name": "c", "distribution": "Categorical", "shape": [], "params": {"logits": 0.0}}, bernoulli_x(("c",))
    )
    assert "parameter 'total_count' is an integer; fix it in params" in refusal(
        normal_root(), {"name": "x", "distribution": "Binomial", "parents": ["z"], "observed": "x"}
    )
    assert "Normal has no parameter 'mean'" in refusal({**normal_root(), "params": {"mean": 0.0, "scale": 1.0}}, x)
    assert "missing key 'shape'" in refusal({k: v for k, v in normal_root().items() if k != "shape"}, x)
    assert "has no parents, so hidden has no network" in refusal({**normal_root(), "hidden": [4]}, x)
    assert "both observe batch['x']" in refusal(normal_root(), x, {**x, "name": "x2"})
    assert "observed = 'c' is not a batch key" in refusal(normal_root(), {**x, "observed": "c"})
    assert "params.loc has shape [2], which does not broadcast to [3]" in refusal({**normal_root(), "params": {"loc": [0.0, 1.0], "scale": 1.0}}, x)
    assert "shape = 20: expected a list of integers >= 1" in refusal({**normal_root(), "shape": 20}, x)
    assert "unknown activation 'tanhh'" in refusal(normal_root(), {**x, "activation": "tanhh"})
    assert "learn = true applies to a root site's params" in refusal(normal_root(), {**x, "learn": True})
    assert "enumerate = true needs shape = [] (one value per example), got [2]" in refusal(
        {"name": "b", "distribution": "Bernoulli", "shape": [2], "params": {"logits": 0.0}, "enumerate": True}, bernoulli_x(("b",))
    )
    assert "nothing for a network to predict" in refusal(normal_root(), {**x, "distribution": "Normal", "params": {"loc": 0.0, "scale": 1.0}})
    assert "categories applies to a Categorical site" in refusal({**normal_root(), "categories": 3}, x)
    assert "categories = 4, but batch['y'] takes 3 values" in refusal(
        normal_root(), x, {"name": "y", "distribution": "Categorical", "categories": 4, "params": {"logits": 0.0}, "observed": "y"}
    )
    assert "parameter 'scale_tril' is not shaped like the value" in refusal(
        normal_root(), {**x, "distribution": "MultivariateNormal"}, spec=DataSpec("real", (12,), "real")
    )
    text = DataSpec("text", (7,), "categorical", num_categories=5, variable_length=True)
    assert "variable-length sequences" in refusal(normal_root(), x, spec=text)
    with pytest.raises(ConfigError, match=r"\[model\] site = .*: expected a list of tables"):
        resolve_config(tiny_experiment(model={"name": "graph", "site": normal_root()}))


def test_a_refusal_through_the_experiment_builder_names_the_model_table():
    config = tiny_experiment(model={"name": "graph", "site": [normal_root(), bernoulli_x(("q",))]})
    with pytest.raises(ConfigError, match=r"^\[model\] 'graph': site 'x': unknown parent 'q'"):
        Experiment.from_config(config)


def test_declared_batch_keys_can_be_parents():
    model = graph(normal_root(), bernoulli_x(("z", "c")), batch_keys={"c": {"shape": [2], "categories": 5}})
    assert model.networks["x"].in_features == 3 + 2 * 5
    batch = {**batch_of(), "c": torch.randint(0, 5, (5, 2))}
    model.check_batch(batch)
    poutine.trace(model).get_trace(**batch)
    with pytest.raises(DataError, match=r"reads batch\['c'\]"):
        model.check_batch(batch_of())


def test_check_batch_refuses_hidden_labels_read_as_given():
    batch = {**batch_of(), "y_mask": torch.tensor([True, True, False, True, True])}
    with pytest.raises(DataError, match=r"row 2 is False, but site 'x' reads batch\['y'\] as given"):
        graph(normal_root(), bernoulli_x(("z", "y"))).check_batch(batch)
    graph(*M2_SITES).check_batch(batch)  # the label site imputes the hidden ones


def test_check_batch_refuses_data_outside_the_observed_support():
    model = graph(normal_root(), bernoulli_x())
    batch = batch_of()
    batch["x"][2, 4] = 0.5
    with pytest.raises(DataError, match=r"site 'x' \(Bernoulli\) needs batch\['x'\] in its support boolean, but row 2, feature 4 holds 0.5"):
        model.check_batch(batch)


# --- TOML ---------------------------------------------------------------------------------------


def test_site_tables_round_trip_through_the_run_folders_toml():
    config = tiny_experiment(
        model={
            "name": "graph",
            "site": list(M2_SITES)
            + [{"name": "w", "distribution": "Normal", "shape": [2, 2], "params": {"loc": [[0.0, 1.0], [2.0, 3.0]], "scale": 1}}],
            "batch_keys": {"c": {"shape": [2], "categories": 5}, "d": [3]},
        }
    )
    resolved = resolve_config(config)
    text = dump_toml(resolved)
    assert "[[model.site]]" in text and "params = { logits = [0.0, 1.0, -1.0] }" in text
    assert tomllib.loads(text)["model"] == resolved["model"]
    assert resolve_config(tomllib.loads(text)) == resolved


@pytest.mark.parametrize("name", ["graph_vae", "graph_hierarchical", "graph_cvae", "graph_beta"])
def test_the_experiment_files_build_their_graph_and_its_automatic_guide(name):
    resolved = resolve_config(load_experiment(EXPERIMENTS / f"{name}.toml"))
    assert resolved["guide"]["name"] == "auto"
    assert resolve_config(tomllib.loads(dump_toml(resolved))) == resolved
    mnist = DataSpec("mnist", (784,), "binary", image_shape=(28, 28), num_classes=10)
    model = GraphModel(GraphModelConfig(**{key: value for key, value in resolved["model"].items() if key != "name"}), mnist)
    batch = batch_of(3, mnist)
    model.check_batch(batch)
    assert torch.isfinite(poutine.trace(model).get_trace(**batch).log_prob_sum())
    model.describe(batch)  # the declared latent sites agree with the trace
    guide_options = {key: value for key, value in resolved["guide"].items() if key != "name"}
    auto = GUIDES.resolve("auto")
    check_pair(model, auto(auto.Config(**guide_options), mnist, model), batch)
    if name == "graph_vae":  # mnist_vae.toml's architecture, parameter for parameter
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in GaussianVAE(GaussianVAEConfig(), mnist).parameters())
    if name == "graph_hierarchical":
        ladder = tomllib.loads((EXPERIMENTS / "ladder_mnist.toml").read_text())["model"]
        config = LadderVAEConfig(**{key: value for key, value in ladder.items() if key != "name"})
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in LadderVAE(config, mnist).parameters())


# --- end to end -----------------------------------------------------------------------------------


def test_a_graph_vae_trains_evaluates_and_samples_on_digits(tmp_path, capsys):
    sites = [normal_root("z", 4), bernoulli_x(("z",), (32,))]
    experiment = tiny_experiment(model={"name": "graph", "site": sites}, evaluate={"particles": 10, "test_examples": 100})
    run, final, records = train_with_the_cli(tmp_path, experiment, capsys, "experiment.toml")
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    assert math.isfinite(final["test_log_likelihood"]) and final["test_log_likelihood"] > final["test_elbo"] - 0.5
    assert tomllib.loads((run / "config.toml").read_text())["model"]["site"] == sites
    # evaluate and sample rebuild the model from the run folder's config.toml
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0, capsys.readouterr().err
    assert math.isfinite(json.loads(capsys.readouterr().out)["test_log_likelihood"])
    assert main(["sample", str(run), "--out", str(tmp_path / "samples.png")]) == 0, capsys.readouterr().err
    assert (tmp_path / "samples.png").stat().st_size > 100


def test_a_beta_latent_graph_trains_with_the_automatic_guide(tmp_path):
    sites = [
        {"name": "z", "distribution": "Beta", "shape": [4], "params": {"concentration1": 1.0, "concentration0": 1.0}},
        bernoulli_x(("z",), (32,)),
    ]
    config = tiny_experiment(
        model={"name": "graph", "site": sites}, guide={"name": "auto", "hidden": [32]}, evaluate={"particles": 10, "test_examples": 100}
    )
    experiment = Experiment.from_config(config)
    final = experiment.train(tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    assert math.isfinite(final["test_log_likelihood"]) and final["test_kl/z"] > 0


def test_the_readme_graph_example_builds_and_trains(tmp_path):
    """The README's [[model.site]] example (Beta latents, the auto guide), on digits."""
    import re
    from pathlib import Path

    from pyrovae.experiment import Experiment

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### A model declared in TOML"):]
    example = tomllib.loads(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
    assert example["model"]["name"] == "graph" and example["guide"]["name"] == "auto"
    example["model"]["site"][1]["hidden"] = [32]
    config = tiny_experiment(model=example["model"], guide={"name": "auto", "hidden": [32]}, train={"epochs": 1, "batch_size": 128})
    final = Experiment.from_config(config).train(tmp_path, progress=False)
    assert math.isfinite(final["test_log_likelihood"]) and final["test_log_likelihood"] > final["test_elbo"] - 1.0
