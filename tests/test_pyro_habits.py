"""Pyro's habits are the contract: pairs written as Pyro's examples write them (tests/pyro_style.py)
go through train, evaluate, sample and analyze; the data plate and the observed site are found in
the model's own trace; batch-norm decoders take the particle dimension; a network that cannot
take it is refused before training, in one line; importing pyrovae changes no Pyro setting."""

import json
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyrovae
from pyrovae import DataSpec, Guide, Model, PairMismatchError
from pyrovae.cli import main
from pyrovae.experiment import Experiment
from pyrovae.pair import check_pair
from pyrovae.traces import trace_pair
from tests import pyro_style
from tests.conftest import tiny_experiment

DIGITS = {"name": "digits"}
FRAMES = {"name": "tests.pyro_style:frames"}


def experiment(data, model, guide, objective=None, **extra):
    config = tiny_experiment(
        data=data,
        model={"name": f"tests.pyro_style:{model}"},
        guide={"name": guide if guide == "auto" else f"tests.pyro_style:{guide}", **({"hidden": [32]} if guide == "auto" else {})},
        objective=objective or {"name": "elbo"},
        train={"epochs": 2, "batch_size": 64, "lr": 3e-3},
        evaluate={"particles": 10},
        **extra,
    )
    return config


PAIRS = [
    ("images", DIGITS, "ImageVAE", "ImageEncoder", {"name": "iwae", "particles": 3}),
    ("images_auto", DIGITS, "ImageVAE", "auto", None),
    ("documents_batch_norm", DIGITS, "DocumentModel", "DocumentEncoder", {"name": "iwae", "particles": 3}),
    ("documents_auto", DIGITS, "DocumentModel", "auto", None),
    ("markov_frames", FRAMES, "FrameMarkovModel", "FrameMarkovGuide", None),
    ("forward_takes_only_x", DIGITS, "XOnlyVAE", "XOnlyEncoder", None),
    ("forward_takes_only_x_auto", DIGITS, "XOnlyVAE", "auto", None),
]


@pytest.mark.parametrize("label,data,model,guide,objective", PAIRS, ids=[p[0] for p in PAIRS])
def test_pyro_style_pairs_train_evaluate_sample_and_analyze(tmp_path, capsys, label, data, model, guide, objective):
    run = tmp_path / label
    final = Experiment.from_config(experiment(data, model, guide, objective)).train(run, progress=False)
    assert torch.isfinite(torch.tensor(final["test_log_likelihood"]))
    assert final["test_log_likelihood"] > final["test_elbo"] - 1.0  # log p(x) >= ELBO up to Monte Carlo error
    # Frames have lengths but are not tokens: no perplexity.
    assert ("test_perplexity" in final) is False
    assert main(["evaluate", str(run), "--particles", "10", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_log_likelihood"] == pytest.approx(final["test_log_likelihood"], abs=1e-4)
    assert main(["sample", str(run)]) == 0
    assert any((run / name).exists() for name in ("samples.png", "samples.json"))
    assert main(["analyze", str(run), "--samples", "30", "--test-examples", "20"]) == 0
    assert (run / "analysis" / "posterior.nc").stat().st_size > 0
    assert "report.md" in {p.name for p in (run / "analysis").iterdir()}


def test_the_data_plate_and_observed_site_come_from_the_trace():
    spec = DataSpec("toy", (64,), "binary")
    model = pyro_style.ImageVAE(pyro_style.Sizes(), spec)
    x = torch.bernoulli(torch.full((8, 64), 0.3))
    description = model.describe({"x": x})
    assert description.data_plate == "images"
    assert model.observed_site == "obs"
    assert [(s.name, s.event_shape) for s in description.latent] == [("latent", (4,))]
    # The plate reaches pyrovae's per-example code as "data", so IWAE has per-example terms.
    guide = pyro_style.ImageEncoder(pyro_style.Sizes(), spec, model)
    check_pair(model, guide, {"x": x})
    model_trace, guide_trace = trace_pair(model, guide, {"x": x}, max_plate_nesting=1, particles=5)
    frames = {f.name for f in model_trace.nodes["obs"]["cond_indep_stack"]}
    assert frames == {"data", "particles"}
    assert model_trace.nodes["obs"]["log_prob"].shape == (5, 8)


def test_batch_norm_particles_equal_particle_by_particle():
    """In evaluation mode, a BatchNorm1d decoder given (K, B, D) latents scores each particle as a
    call on that particle alone would (the silent alternative: normalising over the wrong axis)."""
    spec = DataSpec("toy", (8,), "binary")  # 8 features, and batches of 8 rows: (K, 8, 8) is ambiguous
    model = pyro_style.DocumentModel(pyro_style.Sizes(latent=3), spec)
    guide = pyro_style.DocumentEncoder(pyro_style.Sizes(latent=3), spec, model)
    x = torch.bernoulli(torch.full((8, 8), 0.4), generator=torch.Generator().manual_seed(1))
    check_pair(model, guide, {"x": x})
    for _ in range(3):  # move the running statistics off their initial values
        model(x=x)
    model.eval(), guide.eval()
    with torch.no_grad():
        model_trace, guide_trace = trace_pair(model, guide, {"x": x}, max_plate_nesting=1, particles=4)
        vectorized = model_trace.nodes["obs"]["log_prob"]
        draws = guide_trace.nodes["logtheta"]["value"]
        for k in range(4):
            one = pyro.poutine.trace(pyro.poutine.condition(model, data={"logtheta": draws[k]})).get_trace(x=x)
            one.compute_log_prob()
            assert torch.allclose(one.nodes["obs"]["log_prob"], vectorized[k], atol=1e-5)


class MatrixDecoderModel(Model):
    """z ~ Normal(0, I), x ~ Bernoulli(z W): written with torch.mm, which takes 2-d inputs only."""

    def __init__(self, config=None, data=None):
        super().__init__(data)
        self.weight = nn.Parameter(torch.randn(3, data.x_features))

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=torch.mm(z, self.weight)).to_event(1), obs=x)


class MatrixGuide(Guide):
    def __init__(self, config=None, data=None, model=None):
        super().__init__(data)
        self.net = nn.Linear(data.x_features, 6)

    def forward(self, x, **batch):
        loc, raw = self.net(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, raw.exp()).to_event(1))


def test_a_network_that_cannot_take_particles_is_refused_before_training():
    spec = DataSpec("toy", (6,), "binary")
    model = MatrixDecoderModel(None, spec)
    guide = MatrixGuide(None, spec, model)
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    with pytest.raises(PairMismatchError, match=r"^MatrixDecoderModel/MatrixGuide cannot take a leading particle dimension \(RuntimeError: "):
        check_pair(model, guide, {"x": x})


@pytest.mark.parametrize("guide", ["auto", "ImageEncoder"])
def test_grey_levels_observed_by_a_users_bernoulli_are_named_as_the_data_not_as_particles(guide, tmp_path):
    config = experiment({**DIGITS, "binarize": "none"}, "ImageVAE", guide)
    with pytest.raises(pyrovae.DataError, match=r"^ImageVAE observes site 'obs' with Bernoulli \(support boolean\), but the data lie outside it \(e\.g\. 0\.\d+ at index \[\d+, \d+\]"):
        Experiment.from_config(config).train(tmp_path / "run", progress=False)


def test_a_forward_without_batch_keywords_gets_the_keys_it_names_and_must_take_its_scheduled_inputs():
    spec = DataSpec("toy", (6,), "binary", num_classes=2)
    seen = {}

    class Tempered(pyro_style.XOnlyVAE):
        scheduled_inputs = {"temperature": 1.0}

        def forward(self, x, temperature):
            seen.update(temperature=temperature)
            return super().forward(x)

    class Untempered(Tempered):
        def forward(self, x):
            return pyro_style.XOnlyVAE.forward(self, x)

    x = torch.bernoulli(torch.full((4, 6), 0.5))
    Tempered(pyro_style.Sizes(), spec)(x, y=torch.zeros(4, dtype=torch.long), temperature=0.3)
    assert seen == {"temperature": 0.3}
    with pytest.raises(TypeError, match="Untempered.forward declares the scheduled input 'temperature' but takes no such argument"):
        Untempered(pyro_style.Sizes(), spec)(x, temperature=0.3)


def test_a_forward_without_batch_keywords_must_take_the_keys_that_say_how_to_read_x_and_y():
    spec = DataSpec("toy", (6,), "binary", num_classes=2)
    x = torch.bernoulli(torch.full((4, 6), 0.5))

    class Labelled(pyro_style.XOnlyVAE):
        def forward(self, x, y):
            return pyro_style.XOnlyVAE.forward(self, x)

    model = Labelled(pyro_style.Sizes(), spec)
    model(x, y=torch.zeros(4, dtype=torch.long))  # labels it names, nothing else
    with pytest.raises(TypeError, match="Labelled.forward takes no 'y_mask', which the batch has and which says how to read y"):
        model(x, y=torch.zeros(4, dtype=torch.long), y_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="XOnlyVAE.forward takes no 'mask', which the batch has and which says how to read x"):
        pyro_style.XOnlyVAE(pyro_style.Sizes(), spec)(x, mask=torch.ones(4, 6, dtype=torch.bool))


def test_grey_levels_at_a_bernoulli_that_opts_out_of_validation_are_scored_as_written():
    """Pyro's VAE tutorial observes grey levels with Bernoulli(..., validate_args=False): no refusal."""

    class Tutorial(pyro_style.ImageVAE):
        def forward(self, x, **batch):
            with pyro.plate("images", x.shape[0]):
                z = pyro.sample("latent", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
                probs = torch.sigmoid(self.decoder(z))
                pyro.sample("obs", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    spec = DataSpec("toy", (6,), "unit_interval")
    model = Tutorial(pyro_style.Sizes(), spec)
    check_pair(model, pyro_style.ImageEncoder(pyro_style.Sizes(), spec, model), {"x": torch.rand(8, 6)})


def test_importing_pyrovae_changes_no_pyro_setting():
    script = textwrap.dedent(
        """
        import pyro, torch
        before = dict(pyro.settings.get())
        import pyrovae, pyrovae.models, pyrovae.guides, pyrovae.experiment
        assert dict(pyro.settings.get()) == before, (before, pyro.settings.get())
        # A PyroModule of the user's own code keeps its parameters in Pyro's param store.
        layer = pyro.nn.PyroModule[torch.nn.Linear](2, 1)
        layer(torch.ones(1, 2))
        assert "weight" in dict(pyro.get_param_store().named_parameters()), list(pyro.get_param_store().keys())
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_readme_lead_example_trains_as_written(tmp_path, monkeypatch, capsys):
    """The README's opening example, copied into a folder of its own and run from elsewhere."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lead = readme[: readme.index("## Quickstart")]
    (python, toml) = [code for language, code in re.findall(r"```(\w+)\n(.*?)```", lead, re.S) if language in ("python", "toml")]
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "mymodels.py").write_text(python)
    (tmp_path / "project" / "my_experiment.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "mine"
    assert main(["train", "project/my_experiment.toml", "--out", str(run), "--set", "train.epochs=2", "--set", "evaluate.particles=20", "--no-progress"]) == 0
    final = json.loads((run / "final.json").read_text())
    assert final["test_log_likelihood"] > final["test_elbo"] - 1.0
    assert (run / "samples.png").exists()
    # The run folder stands for the experiment from anywhere: the user's module is found again.
    monkeypatch.chdir(run.parent)
    capsys.readouterr()
    assert main(["train", str(run), "--resume", "--set", "train.epochs=3", "--set", "evaluate.particles=20", "--no-progress"]) == 0
    assert json.loads((run / "final.json").read_text())["epochs"] == 3


def test_batch_norm_folds_enumeration_dims_and_leaves_user_layouts_alone():
    from pyrovae.particles import make_batch_norm_particle_safe

    layer = nn.BatchNorm1d(8)
    make_batch_norm_particle_safe(layer)
    layer.running_mean.normal_()
    layer.eval()
    inputs = torch.randn(3, 8, 8)  # (C values, B = 8 rows, H = 8 features): ambiguous for BatchNorm1d
    expected = torch.stack([layer(row) for row in inputs])
    with pyro.poutine.enum(first_available_dim=-2):
        assert torch.allclose(layer(inputs), expected)
    # Outside particles and enumeration, (N, C, L) is the user's own layout, as torch reads it.
    plain = nn.BatchNorm1d(8)
    plain.load_state_dict(layer.state_dict())
    plain.eval()
    assert torch.allclose(layer(inputs), plain(inputs))


def test_the_checks_leave_batch_norm_statistics_alone():
    spec = DataSpec("toy", (8,), "binary")
    model = pyro_style.DocumentModel(pyro_style.Sizes(latent=3), spec)
    guide = pyro_style.DocumentEncoder(pyro_style.Sizes(latent=3), spec, model)
    before = [b.clone() for b in list(model.buffers()) + list(guide.buffers())]
    check_pair(model, guide, {"x": torch.bernoulli(torch.full((8, 8), 0.4))})
    after = list(model.buffers()) + list(guide.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_users_auxiliary_term_under_their_own_plate_is_in_the_loss_and_in_no_reported_number():
    class Model_(pyro_style.ImageVAE):
        def forward(self, x, **batch):
            with pyro.plate("images", x.shape[0]):
                z = pyro.sample("latent", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
                pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x.reshape(-1, self.data.x_features))
                if self.training:
                    pyrovae.auxiliary_term("brightness", -(z.sum(-1) - x.reshape(x.shape[0], -1).mean(-1)) ** 2)

    from pyrovae.objectives import build_objective

    exp = Experiment.from_config(experiment({**DIGITS, "binarize": "static"}, "ImageVAE", "auto"))
    torch.manual_seed(0)
    model = Model_(pyro_style.Sizes(), exp.data.spec)
    batch = exp.data.rows("train", 0, 32)
    model.describe(batch)
    assert [site.name for site in model.description.observed] == ["obs"]  # the term is not an observation
    from pyrovae.guides import AutoGuide, AutoGuideConfig

    guide = AutoGuide(AutoGuideConfig(hidden=[16]), exp.data.spec, model)
    for name, options in (("elbo", {}), ("iwae", {"particles": 4})):
        objective = build_objective(name, **options)
        objective(model, guide, batch)
        model.eval()
        torch.manual_seed(1)
        plain_loss, plain = objective(model, guide, batch)
        model.train()
        torch.manual_seed(1)
        loss, metrics = objective(model, guide, batch)
        for key in plain:
            torch.testing.assert_close(metrics[key], plain[key], msg=key)
        term = metrics["auxiliary/brightness"]
        assert float(term) < 0
        torch.testing.assert_close(loss.detach(), plain_loss.detach() - term)
