"""Pairs written the way Pyro's own examples write theirs, changed only by subclassing
``pyrovae.Model`` / ``pyrovae.Guide``: plates named after what they hold (``"images"``,
``"documents"``, ``"sequences"``), observed sites named ``"obs"``, batch normalisation in a
decoder, a time loop under ``pyro.markov`` with masks, and no ``latent_sites`` anywhere.
``tests/test_pyro_habits.py`` takes each through train, evaluate, sample and analyze.
"""

from __future__ import annotations

import pyrovae

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae import DataSpec, Guide, Model
from pyrovae.data import make_splits


@dataclass
class Sizes:
    latent: int = 4
    hidden: int = 32


# --- a VAE as in Pyro's examples/vae: plate "images", site "obs" -------------------------------


class ImageVAE(Model):
    """z_n ~ Normal(0, I),  obs_n ~ Bernoulli(decoder(z_n)),  n in plate "images"."""

    Config = Sizes

    def __init__(self, config: Sizes, data: DataSpec):
        super().__init__(data)
        self.z_dim = config.latent
        self.decoder = nn.Sequential(nn.Linear(config.latent, config.hidden), nn.Softplus(), nn.Linear(config.hidden, data.x_features))

    def forward(self, x, **batch):
        with pyro.plate("images", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x.reshape(-1, self.data.x_features))


class ImageEncoder(Guide):
    """q(z_n | x_n) = Normal(mu(x_n), sigma(x_n)),  n in plate "images"."""

    Config = Sizes

    def __init__(self, config: Sizes, data: DataSpec, model: Model):
        super().__init__(data)
        self.hidden = nn.Sequential(nn.Linear(data.x_features, config.hidden), nn.Softplus())
        self.loc = nn.Linear(config.hidden, config.latent)
        self.scale = nn.Linear(config.hidden, config.latent)

    def forward(self, x, **batch):
        h = self.hidden(x.reshape(-1, self.data.x_features))
        with pyro.plate("images", x.shape[0]):
            pyro.sample("latent", dist.Normal(self.loc(h), torch.exp(self.scale(h))).to_event(1))


class XOnlyVAE(ImageVAE):
    """ImageVAE with ``forward(self, x)``, as Pyro's tutorials write it: the data's labels are not passed."""

    def forward(self, x):
        return super().forward(x)


class XOnlyEncoder(ImageEncoder):
    """ImageEncoder with ``forward(self, x)``."""

    def forward(self, x):
        return super().forward(x)


# --- ProdLDA's habits: plate "documents", a BatchNorm1d decoder, a logistic-normal topic mix ----


class DocumentModel(Model):
    """logtheta_d ~ Normal(0, I_K),  theta_d = softmax(logtheta_d),
    obs_d ~ Bernoulli(BatchNorm(W theta_d)),  d in plate "documents" (ProdLDA's decoder, with
    Bernoulli words instead of a multinomial)."""

    Config = Sizes

    def __init__(self, config: Sizes, data: DataSpec):
        super().__init__(data)
        self.topics = config.latent
        self.beta = nn.Linear(config.latent, data.x_features, bias=False)
        self.bn = nn.BatchNorm1d(data.x_features, affine=False)

    def forward(self, x, **batch):
        with pyro.plate("documents", x.shape[0]):
            logtheta = pyro.sample("logtheta", dist.Normal(x.new_zeros(self.topics), 1.0).to_event(1))
            theta = F.softmax(logtheta, -1)
            pyro.sample("obs", dist.Bernoulli(logits=self.bn(self.beta(theta))).to_event(1), obs=x)


class DocumentEncoder(Guide):
    """q(logtheta_d | x_d) = Normal(mu, sigma) from a batch-normalised encoder (ProdLDA's)."""

    Config = Sizes

    def __init__(self, config: Sizes, data: DataSpec, model: Model):
        super().__init__(data)
        self.net = nn.Sequential(nn.Linear(data.x_features, config.hidden), nn.Softplus())
        self.loc = nn.Sequential(nn.Linear(config.hidden, config.latent), nn.BatchNorm1d(config.latent, affine=False))
        self.log_scale = nn.Sequential(nn.Linear(config.hidden, config.latent), nn.BatchNorm1d(config.latent, affine=False))

    def forward(self, x, **batch):
        h = self.net(x)
        with pyro.plate("documents", x.shape[0]):
            pyro.sample("logtheta", dist.Normal(self.loc(h), (0.5 * self.log_scale(h)).exp()).to_event(1))


# --- a deep Markov model's habits: a time loop under pyro.markov, masks, plate "sequences" ------


@dataclass
class MarkovSizes:
    latent: int = 3
    hidden: int = 16


class FrameMarkovModel(Model):
    """z_{n,0} = 0,  z_{n,t} ~ Normal(z_{n,t-1} + f(z_{n,t-1}), 0.5),
    obs_{n,t} ~ Normal(g(z_{n,t}), 0.3) where mask_{n,t},   n in plate "sequences", t in pyro.markov."""

    Config = MarkovSizes

    def __init__(self, config: MarkovSizes, data: DataSpec):
        super().__init__(data)
        self.latent = config.latent
        self.transition = nn.Sequential(nn.Linear(config.latent, config.hidden), nn.Tanh(), nn.Linear(config.hidden, config.latent))
        self.emission = nn.Sequential(nn.Linear(config.latent, config.hidden), nn.Tanh(), nn.Linear(config.hidden, data.x_shape[1]))

    def forward(self, x, mask, **batch):
        z = x.new_zeros(x.shape[0], self.latent)
        with pyro.plate("sequences", x.shape[0]):
            for t in pyro.markov(range(x.shape[1])):
                z = pyro.sample(f"z_{t + 1}", dist.Normal(z + self.transition(z), 0.5).mask(mask[:, t : t + 1]).to_event(1))
                pyro.sample(f"obs_{t + 1}", dist.Normal(self.emission(z), 0.3).mask(mask[:, t : t + 1]).to_event(1), obs=x[:, t])


class FrameMarkovGuide(Guide):
    """q(z_{n,t} | z_{n,t-1}, h_{n,t}) with h from a backward GRU over the frames (the DMM's
    combiner, simplified)."""

    Config = MarkovSizes

    def __init__(self, config: MarkovSizes, data: DataSpec, model: Model):
        super().__init__(data)
        self.latent = config.latent
        self.rnn = nn.GRU(data.x_shape[1], config.hidden, batch_first=True)
        self.combiner = nn.Linear(config.hidden + config.latent, 2 * config.latent)

    def forward(self, x, mask, **batch):
        h, _ = self.rnn(x.flip(1))
        h = h.flip(1)
        z = x.new_zeros(x.shape[0], self.latent)
        with pyro.plate("sequences", x.shape[0]):
            for t in pyro.markov(range(x.shape[1])):
                lead = torch.broadcast_shapes(z.shape[:-1], h.shape[:1])
                features = [h[:, t].expand(lead + h.shape[-1:]), z.expand(lead + z.shape[-1:])]
                loc, raw = self.combiner(torch.cat(features, -1)).chunk(2, -1)
                z = pyro.sample(f"z_{t + 1}", dist.Normal(loc, F.softplus(raw) + 1e-3).mask(mask[:, t : t + 1]).to_event(1))


@pyrovae.data_loader
def frames(count: int = 240, length: int = 6, features: int = 2, seed: int = 0):
    """Noisy rotating 2-d points of random phase and length 3..``length``, with ``mask`` and ``lengths``."""
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        phase = torch.rand(n, 1, generator=generator) * 6.28
        t = torch.arange(length).float()
        angle = phase + 0.6 * t
        x = torch.stack([angle.cos(), angle.sin()], -1)[..., :features] + 0.1 * torch.randn(n, length, features, generator=generator)
        lengths = torch.randint(3, length + 1, (n,), generator=generator)
        mask = torch.arange(length) < lengths[:, None]
        return {"x": x * mask[..., None], "mask": mask, "lengths": lengths}

    spec = DataSpec("frames", (length, features), "real", variable_length=True)
    return make_splits(spec, split(count), split(count // 4), validation=40, binarize="none", seed=seed)


# Kept for readers: what each Pyro habit is, beside the class that has it.
HABITS = {
    "plate not named 'data'": (ImageVAE, DocumentModel, FrameMarkovModel),
    "observed site 'obs'": (ImageVAE, DocumentModel),
    "BatchNorm1d in the decoder": (DocumentModel,),
    "pyro.markov time loop with masks": (FrameMarkovModel,),
    "no latent_sites": (ImageVAE, DocumentModel, FrameMarkovModel),
}
