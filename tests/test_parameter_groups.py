"""Parameter groups by owner: a guide that reuses a network of its model trains, each parameter
sits in exactly one optimizer group, and gradients cleared before the objective's call."""

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import Guide, LatentSite, Model
from pyrovae.experiment import Experiment
from pyrovae.nn import MLP
from pyrovae.objectives import ELBO
from pyrovae.train import TrainConfig, fit, make_optimizer, parameter_groups
from tests.conftest import tiny_experiment


@dataclass
class ConditionalConfig:
    latent_dim: int = 4
    label_dim: int = 3
    hidden: list[int] = field(default_factory=lambda: [32])


class ConditionalVAE(Model):
    """Conditional VAE (Sohn et al. 2015), labels observed:

        z_n ~ Normal(0, I),   x_n ~ Bernoulli(decoder([z_n, e(y_n)]))

    with e a label embedding that the guide reuses."""

    Config = ConditionalConfig

    def __init__(self, config, data):
        super().__init__(data)
        self.config = config
        self.label_embedding = nn.Embedding(data.num_classes, config.label_dim)
        self.decoder = MLP(config.latent_dim + config.label_dim, config.hidden, data.x_features)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def forward(self, x, y, **batch):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.config.latent_dim), 1.0).to_event(1))
            label = self.label_embedding(y).expand(z.shape[:-1] + (self.config.label_dim,))  # particles, if any
            logits = self.decoder(torch.cat([z, label], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


@dataclass
class ConditionalGuideConfig:
    hidden: list[int] = field(default_factory=lambda: [32])


class ConditionalGuide(Guide):
    """q(z | x, y) = Normal(mu([x, e(y)]), sigma([x, e(y)])), with the model's label embedding e."""

    Config = ConditionalGuideConfig

    def __init__(self, config, data, model):
        super().__init__(data)
        self.latent_dim = model.config.latent_dim
        self.label_embedding = model.label_embedding  # shared with the model
        self.encoder = MLP(data.x_features + model.config.label_dim, config.hidden, 2 * self.latent_dim)

    def forward(self, x, y, **batch):
        loc, raw_scale = self.encoder(torch.cat([x, self.label_embedding(y)], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw_scale) + 1e-4).to_event(1))


CONDITIONAL = {
    "model": {"name": "tests.test_parameter_groups:ConditionalVAE"},
    "guide": {"name": "tests.test_parameter_groups:ConditionalGuide"},
}


def test_each_parameter_is_in_the_group_of_the_part_that_owns_it():
    experiment = Experiment.from_config(tiny_experiment(**CONDITIONAL))
    model, guide = experiment.model, experiment.guide
    optimizer = make_optimizer(model, guide, TrainConfig())
    groups = {group["name"]: group["params"] for group in optimizer.param_groups}
    ids = [id(p) for params in groups.values() for p in params]
    everything = {id(p) for part in (model, guide) for p in part.parameters()}
    assert len(ids) == len(set(ids)) == len(everything)  # each parameter exactly once
    shared = {id(p) for p in model.label_embedding.parameters()}
    assert shared <= {id(p) for p in groups["model"]}
    assert not shared & {id(p) for p in groups["guide"]}
    assert {id(p) for p in groups["guide"]} == {id(p) for p in guide.encoder.parameters()}
    assert parameter_groups(model, guide).keys() == {"model", "guide"}


def test_a_guide_sharing_the_models_network_trains_and_the_shared_weights_move():
    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 2}, **CONDITIONAL))
    shared_before = experiment.model.label_embedding.weight.detach().clone()
    encoder_before = [p.detach().clone() for p in experiment.guide.encoder.parameters()]
    result = fit(experiment.model, experiment.guide, experiment.objective, experiment.data, experiment.train_config, progress=False)
    assert result.state.epoch == 2
    assert experiment.guide.label_embedding is experiment.model.label_embedding
    assert not torch.equal(shared_before, experiment.model.label_embedding.weight.detach())
    assert all(not torch.equal(b, p.detach()) for b, p in zip(encoder_before, experiment.guide.encoder.parameters()))
    assert result.state.history[-1]["valid/elbo"] > result.state.history[0]["valid/elbo"]


def test_the_shared_network_gets_gradients_from_the_guide_too():
    experiment = Experiment.from_config(tiny_experiment(**CONDITIONAL))
    batch = next(experiment.data.batches("train", 16))
    guide_trace = pyro.poutine.trace(experiment.guide).get_trace(**batch)
    guide_trace.log_prob_sum().backward()  # log q(z | x, y) alone, without the model
    assert experiment.model.label_embedding.weight.grad.abs().sum() > 0


class GradientsInsideELBO(ELBO):
    """An objective that computes its gradients during the call (as one wrapping Pyro's
    ``loss_and_grads`` does) and returns a loss with no graph to the parameters."""

    def __call__(self, model, guide, batch):
        loss, metrics = super().__call__(model, guide, batch)
        if torch.is_grad_enabled():
            loss.backward()
            loss = loss.detach().requires_grad_()
        return loss, metrics


def test_gradients_computed_inside_the_objective_call_are_kept():
    """zero_grad runs before the objective: training with gradients computed in the call gives the
    parameters that ordinary training gives, bit for bit."""
    trained = []
    for objective in (ELBO(), GradientsInsideELBO()):
        experiment = Experiment.from_config(tiny_experiment(train={"epochs": 1}))
        fit(experiment.model, experiment.guide, objective, experiment.data, experiment.train_config, progress=False)
        trained.append({**experiment.model.state_dict(), **{f"guide.{k}": v for k, v in experiment.guide.state_dict().items()}})
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name
