"""The mean-field check of ``meanfield_elbo``: on its first call with a pair it follows, with
Pyro's provenance tracking, which latent values each site's distribution is computed from, and
warns (once per objective instance) where a site's parent in the model is drawn from that site in
the guide, the case where its analytic KL terms do not add up to the ELBO."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from torch import nn

from pyrovae.errors import UnsupportedPairError
from pyrovae.objectives import ELBO, MeanFieldELBO, build_objective
from pyrovae.pair import DataSpec
from pyrovae.traces import inspect_pair
from tests import families
from tests.conftest import tiny_pair

DATA = DataSpec("d", (64,), "binary", num_classes=10, image_shape=(8, 8))


def batch(count=12):
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.bernoulli(torch.full((count, 64), 0.3), generator=generator),
        "y": torch.randint(0, 10, (count,), generator=generator),
        "y_mask": torch.zeros(count, dtype=torch.bool),
    }


def two_layer_pair():
    """p(z2) p(z1 | z2) p(x | z1) with the guide q(z1 | x) q(z2 | z1): not mean field."""
    model = families.TwoLayerVAE(families.TwoLayerConfig(), DATA)
    return model, families.TwoLayerGuide(families.GuideConfig(), DATA, model)


class MeanFieldTwoLayerGuide(families.Guide):
    """q(z1 | x) q(z2 | x), both from one encoder (with batch norm), sampled z1 first: the reverse
    of the model's order, which Pyro's order check would flag, but mean field."""

    def __init__(self, model):
        super().__init__(DATA)
        sizes = model.config
        self.encoder = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh())
        self.bottom = nn.Linear(16, 2 * sizes.bottom_dim)
        self.top = nn.Linear(16, 2 * sizes.top_dim)

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            hidden = self.encoder(x)
            pyro.sample("z1", families.gaussian_head(self.bottom(hidden)))
            pyro.sample("z2", families.gaussian_head(self.top(hidden)))


class UntrackableGuide(families.TwoLayerGuide):
    """The dependent guide, written so that provenance cannot follow it (it refuses tagged values)."""

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            z1 = pyro.sample("z1", families.gaussian_head(self.bottom(x)))
            if type(z1) is not torch.Tensor:
                raise TypeError("this guide takes plain tensors only")
            pyro.sample("z2", families.gaussian_head(self.top(z1)))


def meanfield_warnings(objective, model, guide, data, calls=1):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            loss, _ = objective(model, guide, data)
    assert torch.isfinite(loss)
    return [str(w.message) for w in caught if "meanfield_elbo" in str(w.message)]


def test_a_dependent_two_layer_guide_warns_once_naming_the_sites_and_the_fix():
    model, guide = two_layer_pair()
    found = meanfield_warnings(MeanFieldELBO(), model, guide, batch(), calls=3)
    assert len(found) == 1, found
    (message,) = found
    assert "not mean field" in message and "TwoLayerVAE" in message
    assert "draws 'z2' from 'z1'" in message and "draws 'z1' given 'z2'" in message
    assert 'objective.name = "elbo"' in message


def test_each_objective_instance_warns_once():
    model, guide = two_layer_pair()
    assert len(meanfield_warnings(MeanFieldELBO(), model, guide, batch())) == 1
    assert len(meanfield_warnings(MeanFieldELBO(), model, guide, batch())) == 1


def test_the_wrappers_around_meanfield_elbo_warn_too():
    model, guide = two_layer_pair()
    found = meanfield_warnings(build_objective("free_bits", objective="meanfield_elbo", threshold=0.1), model, guide, batch())
    assert len(found) == 1 and "not mean field" in found[0]


def test_elbo_does_not_check():
    model, guide = two_layer_pair()
    assert meanfield_warnings(ELBO(), model, guide, batch()) == []


def test_the_one_site_pair_does_not_warn(binary_batch):
    model, guide = tiny_pair()
    assert meanfield_warnings(MeanFieldELBO(), model, guide, binary_batch, calls=2) == []


def test_a_two_site_mean_field_guide_in_another_order_does_not_warn():
    model = families.TwoLayerVAE(families.TwoLayerConfig(), DATA)
    assert meanfield_warnings(MeanFieldELBO(), model, MeanFieldTwoLayerGuide(model), batch()) == []


def test_a_top_down_ladder_guide_meets_the_condition_and_a_bottom_up_one_does_not():
    """The ladder guide q(z2 | x) q(z1 | z2, x) depends on z2 the way the model does, so each
    analytic KL is taken at parents drawn before its site: no warning. The bottom-up guide is the
    two-layer case."""
    from pyrovae.guides import BottomUpGuide, BottomUpGuideConfig, LadderGuide, LadderGuideConfig
    from pyrovae.models import LadderVAE, LadderVAEConfig

    spec = DataSpec("real", (6,), "real")
    model = LadderVAE(LadderVAEConfig(latent_dims=[4, 2], hidden=[[8], [8]], likelihood="gaussian"), spec)
    data = {"x": torch.randn(7, 6)}
    ladder = LadderGuide(LadderGuideConfig(hidden=[[8], [8]], deterministic=[4, 4]), spec, model)
    assert meanfield_warnings(MeanFieldELBO(), model, ladder, data) == []
    bottom_up = BottomUpGuide(BottomUpGuideConfig(), spec, model)
    (message,) = meanfield_warnings(MeanFieldELBO(), model, bottom_up, data)
    assert "LadderVAE" in message and "'z2' from 'z1'" in message


def test_the_check_moves_neither_the_random_streams_nor_the_batch_norm_statistics():
    model = families.TwoLayerVAE(families.TwoLayerConfig(), DATA)
    guide = MeanFieldTwoLayerGuide(model)
    data = batch()
    checked = MeanFieldELBO()
    info = inspect_pair(model, guide, data)
    statistics = [buffer.clone() for buffer in guide.buffers()]
    generator_state = torch.random.get_rng_state()
    checked.check_mean_field(model, guide, data, info)
    assert torch.equal(torch.random.get_rng_state(), generator_state)
    assert all(torch.equal(before, after) for before, after in zip(statistics, guide.buffers()))

    unchecked = MeanFieldELBO()
    unchecked._meanfield_warned = True  # skips the check
    losses = []
    for objective in (checked, unchecked):
        guide.load_state_dict(guide.state_dict())
        pyro.set_rng_seed(3)
        losses.append(float(objective(model, guide, data)[0].detach()))
    assert losses[0] == losses[1]


def test_where_provenance_cannot_follow_the_guide_pyros_order_check_warns():
    model = families.TwoLayerVAE(families.TwoLayerConfig(), DATA)
    guide = UntrackableGuide(families.GuideConfig(), DATA, model)
    (message,) = meanfield_warnings(MeanFieldELBO(), model, guide, batch())
    assert "could not follow" in message and "TypeError: this guide takes plain tensors only" in message
    assert "the guide samples its sites in the order 'z1', 'z2' and the model in the order 'z2', 'z1'" in message
    assert 'objective.name = "elbo"' in message


def test_m2_with_an_enumerated_label_is_still_refused_by_name_and_not_warned_about():
    model = families.M2(families.ConditionalConfig(), DATA)
    guide = families.M2Guide(families.GuideConfig(), DATA, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedPairError, match="cannot sum out the enumerated site 'y_unobserved'"):
            MeanFieldELBO()(model, guide, batch())
    assert not [w for w in caught if "mean field" in str(w.message)]
    # the objective that sums it out is untouched
    loss, _ = build_objective("enum_elbo")(model, guide, batch())
    assert torch.isfinite(loss)
