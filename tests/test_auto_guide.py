"""guide.name = "auto": the amortized guide drafted from the model's trace. Its mean-field form is
the stock diag_normal guide exactly; each support gets its family; dependent structure follows the
model's inverted graph (ladders, M2's q(z | x, y)); discrete sites are enumerated, score-function or
relaxed; what it cannot draft is refused in one line; the compiled step captures it; it opens the model's
own data plate, so Pyro's Trace_ELBO, TraceGraph_ELBO and TraceEnum_ELBO see one plate and equal ours."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyrovae import DataSpec, LatentSite, Model, PairMismatchError  # noqa: F401
from pyrovae.errors import ConfigError
from pyrovae.experiment import Experiment
from pyrovae.guides.auto import AutoGuide, AutoGuideConfig
from pyrovae.models.ladder import LadderVAE, LadderVAEConfig
from pyrovae.objectives import ELBO, IWAE, EnumELBO, MeanFieldELBO
from pyrovae.pair import check_pair
from tests import families, pyro_style
from tests.conftest import tiny_experiment, tiny_pair
from tests.test_compiled_step import assert_same, eager_and_compiled

from tests.test_pair_supports import SPEC, binary_batch


def toy_batch(rows=16, **extra):
    return binary_batch(rows, **extra)


def auto(model, batch, **options):
    model.describe(batch)
    guide = AutoGuide(AutoGuideConfig(hidden=[16], **options), model.data, model)
    check_pair(model, guide, batch)
    return guide


def test_mean_field_auto_is_the_diag_normal_guide():
    """Same architecture, same parameter layout: with the diag_normal guide's weights copied in, the
    auto guide draws the same z with the same log q, so every number equals."""
    model, written = tiny_pair(features=12, latent_dim=3, hidden=(16, 16))
    batch = toy_batch()
    model.describe(batch)
    guide = AutoGuide(AutoGuideConfig(hidden=[16, 16]), SPEC, model)
    assert sum(p.numel() for p in guide.parameters()) == sum(p.numel() for p in written.parameters())
    linear = [m for m in written.encoder if isinstance(m, torch.nn.Linear)]
    ours = [guide.trunk[0][0], guide.trunk[0][2], guide.root_head]
    for mine, theirs in zip(ours, linear):
        mine.load_state_dict(theirs.state_dict())
    for part in (written, guide):
        torch.manual_seed(3)
        trace = pyro.poutine.trace(part).get_trace(**batch)
        trace.compute_log_prob()
        if part is written:
            expected = (trace.nodes["z"]["value"], trace.nodes["z"]["log_prob"])
    assert torch.equal(trace.nodes["z"]["value"], expected[0])
    assert torch.allclose(trace.nodes["z"]["log_prob"], expected[1])


class SupportsModel(Model):
    """a ~ Beta(2, 2)^2, w ~ Dirichlet(1_3), r ~ Gamma(2, 1), s ~ Uniform(-1, 2),
    x ~ Bernoulli(sigmoid(linear([a, w, r, s])))."""

    def __init__(self, config=None, data=SPEC):
        super().__init__(data)
        self.decoder = torch.nn.Linear(7, data.x_features)

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Beta(x.new_full((2,), 2.0), 2.0).to_event(1))
            w = pyro.sample("w", dist.Dirichlet(x.new_ones(3)))
            r = pyro.sample("r", dist.Gamma(x.new_tensor(2.0), 1.0))
            s = pyro.sample("s", dist.Uniform(x.new_tensor(-1.0), 2.0))
            lead = torch.broadcast_shapes(a.shape[:-1], w.shape[:-1], r.shape, s.shape)
            features = [a.expand(lead + (2,)), w.expand(lead + (3,)), r.expand(lead).unsqueeze(-1), s.expand(lead).unsqueeze(-1)]
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(torch.cat(features, -1))).to_event(1), obs=x)


@pytest.mark.parametrize(
    "family,expected",
    [
        ({}, {"a": dist.Beta, "w": dist.Dirichlet, "r": dist.LogNormal, "s": dist.TransformedDistribution}),
        ({"a": "logit_normal", "w": "logistic_normal"}, {"a": dist.TransformedDistribution, "w": dist.TransformedDistribution}),
    ],
)
def test_each_support_gets_its_family_and_draws_stay_inside(family, expected):
    model = SupportsModel()
    batch = toy_batch()
    guide = auto(model, batch, family=family)
    trace = pyro.poutine.trace(guide).get_trace(**batch)
    for name, kind in expected.items():
        fn = trace.nodes[name]["fn"]
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        assert isinstance(fn, kind), (name, type(fn))
    supports = {"a": constraints.unit_interval, "w": constraints.simplex, "r": constraints.positive, "s": constraints.interval(-1.0, 2.0)}
    for name, support in supports.items():
        assert support.check(trace.nodes[name]["value"]).all(), name
    for objective in (ELBO(), IWAE(particles=4)):
        loss, metrics = objective(model, guide, batch)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in guide.parameters() if p.grad is not None)


def test_analytic_kl_of_a_beta_guide_under_meanfield_elbo():
    """Beta guide on a Beta prior: the mean-field ELBO's analytic KL (torch's Beta-Beta) equals the
    Monte Carlo estimate of Trace_ELBO within its error."""

    class BetaModel(Model):
        def forward(self, x, **batch):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Beta(x.new_ones(4), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(probs=z.mean(-1, keepdim=True).expand(z.shape[:-1] + (12,))).to_event(1), obs=x)

    model = BetaModel(SPEC)
    batch = toy_batch()
    guide = auto(model, batch)
    torch.manual_seed(0)
    _, analytic = MeanFieldELBO()(model, guide, batch)
    torch.manual_seed(0)
    _, sampled = ELBO(particles=4000)(model, guide, batch)
    assert analytic["kl/z"] == pytest.approx(sampled["kl/z"], abs=0.05)


def test_dependent_structure_follows_the_inverted_graph():
    spec = DataSpec("toy", (12,), "binary")
    model = LadderVAE(LadderVAEConfig(latent_dims=[4, 2], hidden=[[16], [8]]), spec)
    batch = toy_batch()
    mean_field = auto(model, batch)
    dependent = auto(model, batch, structure="dependent")
    assert mean_field.parents == {"z1": [], "z2": []}
    assert dependent.order == ["z1", "z2"] and dependent.parents == {"z1": [], "z2": ["z1"]}
    # q(z2 | x, z1): moving z1 moves q(z2).
    trace = pyro.poutine.trace(dependent).get_trace(**batch)
    moved = pyro.poutine.trace(pyro.poutine.condition(dependent, data={"z1": trace.nodes["z1"]["value"] + 1.0})).get_trace(**batch)
    assert not torch.allclose(trace.nodes["z2"]["fn"].loc, moved.nodes["z2"]["fn"].loc)
    # and on a particle dim
    loss, _ = IWAE(particles=3)(model, dependent, batch)
    assert torch.isfinite(loss)


def test_m2_gets_q_y_given_x_and_q_z_given_x_y_and_the_label_is_enumerated():
    model = families.M2(families.ConditionalConfig(), SPEC)
    batch = toy_batch(y=torch.randint(0, 3, (16,)), y_mask=torch.arange(16) % 2 == 0)
    guide = auto(model, batch, structure="dependent")
    assert guide.order == ["y_unobserved", "z"] and guide.parents["z"] == ["y_unobserved"]
    assert guide.classify(**batch).shape == (16, 3)
    loss, metrics = EnumELBO()(model, guide, batch)
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="y_unobserved"):
        ELBO()(model, guide, batch)  # cannot sum the label out: refused by name


def test_m2_with_the_auto_guide_trains_end_to_end(tmp_path):
    config = tiny_experiment(
        data={"name": "digits", "labels_per_class": 5},
        model={"name": "m2", "latent_dim": 4, "hidden": [32], "classifier_hidden": [32], "alpha": 5.0},
        guide={"name": "auto", "hidden": [32], "structure": "dependent"},
        objective={"name": "enum_elbo"},
        train={"epochs": 2, "batch_size": 64, "lr": 3e-3},
    )
    final = Experiment.from_config(config).train(tmp_path, progress=False)
    assert torch.isfinite(torch.tensor(final["test_log_likelihood"]))
    assert 0.0 <= final["test_accuracy"] <= 1.0


@pytest.mark.parametrize("discrete,reparameterized", [("score_function", False), ("relaxed", True)])
def test_discrete_sites_score_function_or_relaxed(discrete, reparameterized):
    model = families.CategoricalVAE(families.DiscreteConfig(), SPEC)
    batch = toy_batch()
    guide = auto(model, batch, discrete=discrete)
    trace = pyro.poutine.trace(guide).get_trace(**batch)
    assert trace.nodes["z"]["fn"].has_rsample is reparameterized
    assert set(trace.nodes["z"]["value"].unique().tolist()) <= {0.0, 1.0}  # one-hot draws either way
    loss, _ = IWAE(particles=3)(model, guide, batch)
    assert torch.isfinite(loss)


def test_what_the_auto_guide_cannot_draft_is_refused_in_one_line():
    spec = DataSpec("frames", (6, 2), "real", variable_length=True)
    markov = pyro_style.FrameMarkovModel(pyro_style.MarkovSizes(), spec)
    data = pyro_style.frames()
    markov.describe(data.rows("valid", 0, 4))
    with pytest.raises(PairMismatchError, match=r"^auto guide: FrameMarkovModel's latent site 'z_1' sits in a pyro.markov scope"):
        AutoGuide(AutoGuideConfig(), spec, markov)
    with pytest.raises(PairMismatchError, match=r"has not been traced"):
        AutoGuide(AutoGuideConfig(), SPEC, families.M2(families.ConditionalConfig(), SPEC))
    with pytest.raises(ConfigError, match=r"structure = 'tree'"):
        Experiment.from_config(tiny_experiment(guide={"name": "auto", "structure": "tree"}))


def test_a_declared_latent_sites_is_checked_against_the_trace():
    class Declared(Model):
        latent_sites = property(lambda self: (declared_site("z", (5,)),))

        def forward(self, x, **batch):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(x.new_zeros(4), 1.0).to_event(1))

    with pytest.raises(PairMismatchError, match=r"declares latent site 'z' with event shape \(5,\), but its trace samples event shape \(4,\)"):
        Declared(SPEC).describe(toy_batch())


def declared_site(name, shape):
    return LatentSite(name, shape)


@pytest.mark.parametrize("structure", ["mean_field", "dependent"])
def test_the_compiled_step_captures_an_auto_pair(structure):
    model = families.TwoLayerVAE(families.TwoLayerConfig(), SPEC)
    batch = toy_batch(rows=32)
    guide = auto(model, batch, structure=structure)
    with pyro.validation_enabled(False):  # the fit loop captures after its validated first step
        results, step, messages = eager_and_compiled(model, guide, ELBO(), batch)
    assert step.active, messages
    assert_same(results)


class PixelPlateVAE(Model):
    """z_n ~ Normal(0, I_4) in plate "rows" at dim -2, x_{n,p} ~ Bernoulli(decoder(z_n)_p) in plate
    "pixels" at dim -1: Pyro's way with a plate instead of to_event."""

    def __init__(self, data=SPEC):
        super().__init__(data)
        self.decoder = torch.nn.Linear(4, data.x_features)

    def forward(self, x, **batch):
        with pyro.plate("rows", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(4), 1.0).to_event(1))  # (B, 1, 4)
            with pyro.plate("pixels", x.shape[1], dim=-1):
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z).squeeze(-2)), obs=x)


def test_a_data_plate_left_of_dim_minus_one_is_honoured():
    """The guide samples z at the model's plate dim, so no site broadcasts (B,) against (B, 1): the
    KL is that of a 4-d latent, and the ELBO equals the written mean-field guide's on the same draws."""
    model = PixelPlateVAE()
    batch = toy_batch()
    guide = auto(model, batch)
    assert model.description.data_plate == "rows" and model.description.data_plate_dim == -2
    trace = pyro.poutine.trace(guide).get_trace(**batch)
    assert trace.nodes["z"]["value"].shape == (16, 1, 4)
    torch.manual_seed(0)
    _, metrics = ELBO(particles=200)(model, guide, batch)
    assert 0.0 < metrics["kl/z"] < 20.0  # a broadcast (B, B) term would be ~16 times larger
    loss, iwae = IWAE(particles=4)(model, guide, batch)
    assert torch.isfinite(loss) and iwae["iwae"] >= metrics["elbo"] - 1.0


def test_model_mistakes_are_one_line():
    class NoObservation(Model):
        def forward(self, x, **batch):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Bernoulli(logits=x.new_zeros(12)).to_event(1))  # forgot obs=x

    class NoToEvent(Model):
        def forward(self, x, **batch):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Bernoulli(logits=x.new_zeros(12)), obs=x)

    with pytest.raises(PairMismatchError, match=r"^NoObservation observes nothing: give the data's site obs=x"):
        NoObservation(SPEC).describe(toy_batch())
    with pytest.raises(PairMismatchError, match=r"^NoToEvent failed when traced on the first 16 rows \(ValueError: Shape mismatch inside plate\('data'\)"):
        NoToEvent(SPEC).describe(toy_batch())
    model = families.TwoLayerVAE(families.TwoLayerConfig(), SPEC)
    model.describe(toy_batch())
    with pytest.raises(PairMismatchError, match=r"family 'beta' does not fit TwoLayerVAE's site 'z1' \(support real\); choose one of normal"):
        AutoGuide(AutoGuideConfig(family={"z1": "beta"}), SPEC, model)


def test_the_encoder_inputs_can_be_chosen():
    model = families.ConditionalVAE(families.ConditionalConfig(), SPEC)
    batch = toy_batch(y=torch.randint(0, 3, (16,)))
    assert auto(model, batch).inputs == [("x", 12), ("y", 3)]  # the model conditions on y: read one-hot
    assert auto(model, batch, inputs=["x"]).inputs == [("x", 12)]
    with pytest.raises(PairMismatchError, match=r"inputs = \['q'\]: name batch keys the encoder reads, of \['x', 'y'\]"):
        auto(model, batch, inputs=["q"])


# --- the guide opens the model's own plate: plain Pyro objectives see one plate -----------------


class ImageMixtureVAE(Model):
    """y_n ~ Categorical(1/3) (enumerated),  z_n ~ Normal(0, I_4),
    obs_n ~ Bernoulli(decoder([onehot(y_n), z_n])),  n in plate "images": Pyro's habits (plate named
    after what it holds, site "obs", enumeration marked in the model)."""

    def __init__(self, data=SPEC):
        super().__init__(data)
        self.decoder = torch.nn.Linear(3 + 4, data.x_features)

    def forward(self, x, **batch):
        with pyro.plate("images", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(x.new_full((3,), 1.0 / 3)), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(x.new_zeros(4), 1.0).to_event(1))
            one_hot = torch.nn.functional.one_hot(y, 3).to(x.dtype)
            lead = torch.broadcast_shapes(one_hot.shape[:-1], z.shape[:-1])
            features = torch.cat([one_hot.expand(lead + (3,)), z.expand(lead + (4,))], -1)
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(features)).to_event(1), obs=x)


def image_vae():
    return pyro_style.ImageVAE(pyro_style.Sizes(latent=4, hidden=16), SPEC)


def plates(trace):
    """The plates a trace opens: {name: (size, subsample size)} from their subsample sites, and the
    (name, dim, size) frames its sample sites sit in."""
    opened = {
        name: (site["fn"].size, site["fn"].subsample_size)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and pyro.poutine.util.site_is_subsample(site)
    }
    frames = {(f.name, f.dim, f.size) for site in trace.nodes.values() if site["type"] == "sample" for f in site["cond_indep_stack"]}
    return opened, frames


def plate_warnings(caught):
    return [str(w.message) for w in caught if "plate" in str(w.message)]


@pytest.mark.parametrize(
    "make,structure",
    [(image_vae, "mean_field"), (image_vae, "dependent"), (ImageMixtureVAE, "dependent"), (PixelPlateVAE, "mean_field")],
    ids=["images", "images-dependent", "images-enumerated", "rows-at-dim-2"],
)
def test_the_guide_opens_the_models_own_data_plate(make, structure):
    """Same name, dim and size as the model's data plate, whether pyrovae's rename is on (frames
    read "data" in both halves) or off (the raw names: the model's own in both)."""
    model = make()
    batch = toy_batch()
    guide = auto(model, batch, structure=structure)
    plate = model.description.data_plate
    for renamed in (True, False):
        if not renamed:
            model.use_data_plate("data")  # the alias off: each half as written
            guide.use_data_plate("data")
        model_plates, model_frames = plates(pyro.poutine.trace(model).get_trace(**batch))
        guide_plates, guide_frames = plates(pyro.poutine.trace(guide).get_trace(**batch))
        assert list(guide_plates) == [plate] and guide_plates[plate] == model_plates[plate]
        assert guide_frames <= model_frames
        assert {name for name, _, _ in guide_frames} == {"data" if renamed else plate}


@pytest.mark.parametrize("make", [image_vae, PixelPlateVAE], ids=["images", "rows-at-dim-2"])
def test_pyros_elbos_see_one_plate_and_equal_pyrovaes_elbo(make):
    """Trace_ELBO, TraceGraph_ELBO and TraceEnum_ELBO on the trained pair, as a user would call them:
    no "plate statements in guide but not model" warning, and the loss pyrovae's elbo reports on the
    same draws."""
    model = make()
    batch = toy_batch()
    guide = auto(model, batch)
    rows = batch["x"].shape[0]
    nesting = 2 if model.description.data_plate_dim == -2 else 1
    pyro.set_rng_seed(5)
    ours, _ = ELBO(max_plate_nesting=nesting)(model, guide, batch)
    for reference in (
        pyro.infer.Trace_ELBO(),
        pyro.infer.TraceGraph_ELBO(),
        pyro.infer.TraceEnum_ELBO(max_plate_nesting=nesting),
    ):
        pyro.set_rng_seed(5)
        with warnings.catch_warnings(record=True) as caught, pyro.validation_enabled(True):
            warnings.simplefilter("always")
            theirs = reference.loss(model, guide, **batch)
        assert plate_warnings(caught) == [], type(reference).__name__
        assert float(ours.detach()) == pytest.approx(theirs / rows, rel=1e-5), type(reference).__name__


def test_trace_enum_elbo_sums_the_auto_guides_enumerated_label_in_the_models_plate():
    """The enumerated label of a model in plate "images": TraceEnum_ELBO runs without a plate
    warning and equals pyrovae's enum_elbo on the same draws."""
    model = ImageMixtureVAE()
    batch = toy_batch()
    guide = auto(model, batch, structure="dependent")
    assert guide.enumerated == ["y"] and guide.parents["z"] == ["y"]
    objective = EnumELBO()
    objective.prepare(model, guide, batch)
    pyro.set_rng_seed(2)
    ours, metrics = objective(model, guide, batch)
    pyro.set_rng_seed(2)
    with warnings.catch_warnings(record=True) as caught, pyro.validation_enabled(True):
        warnings.simplefilter("always")
        theirs = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, **batch)
    assert plate_warnings(caught) == []
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()) / len(batch["x"]), abs=1e-5)
    assert float(metrics["elbo"]) == pytest.approx(-float(theirs.detach()) / len(batch["x"]), abs=1e-5)
