"""Small model/guide pairs of every family, written as a user would against the README's
contracts. ``tests/test_families.py`` trains each end to end through ``Experiment`` on digits
(or on toy sequences), then runs ``evaluate`` and ``sample``.

Each model and guide opens with the equations it implements.
"""

from __future__ import annotations

import pyrovae

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae import Guide, LatentSite, Model
from pyrovae.distributions import BernoulliLogits, DiagonalNormal, StandardNormal
from pyrovae.nn import MLP


@dataclass
class GuideConfig:
    """Guides take their latent sizes from the model; only their own networks are configured."""

    hidden: list[int] = field(default_factory=lambda: [64])


def gaussian_head(output: torch.Tensor, event: int = 1) -> DiagonalNormal:
    loc, raw_scale = output.chunk(2, -1)
    return DiagonalNormal(loc, F.softplus(raw_scale) + 1e-3, event)


# --- conditional VAE (Sohn et al. 2015) ------------------------------------------------------


@dataclass
class ConditionalConfig:
    latent_dim: int = 4
    hidden: list[int] = field(default_factory=lambda: [64])


class ConditionalVAE(Model):
    """CVAE with a prior network, labels y into every network:

        z_n ~ Normal(mu_p(y_n), sigma_p(y_n))                prior network
        x_n ~ Bernoulli(decoder([z_n, onehot(y_n)]))
    """

    Config = ConditionalConfig

    def __init__(self, config: ConditionalConfig, data):
        super().__init__(data)
        self.config, self.classes = config, data.num_classes
        self.prior_net = MLP(self.classes, config.hidden, 2 * config.latent_dim)
        self.decoder = MLP(config.latent_dim + self.classes, config.hidden, data.x_features)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def forward(self, x, y, **batch):
        label = F.one_hot(y, self.classes).to(x.dtype)
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", gaussian_head(self.prior_net(label)))
            label = label.expand(z.shape[:-1] + label.shape[-1:])  # particle dims, if any
            pyro.sample("x", BernoulliLogits(self.decoder(torch.cat([z, label], -1))), obs=x)


class ConditionalGuide(Guide):
    """q(z_n | x_n, y_n) = Normal(mu(x_n, y_n), sigma(x_n, y_n))."""

    Config = GuideConfig

    def __init__(self, config: GuideConfig, data, model):
        super().__init__(data)
        sizes = model.config
        self.classes = data.num_classes
        self.encoder = MLP(data.x_features + self.classes, config.hidden, 2 * sizes.latent_dim)

    def forward(self, x, y, **batch):
        label = F.one_hot(y, self.classes).to(x.dtype)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", gaussian_head(self.encoder(torch.cat([x, label], -1))))


# --- semi-supervised M2 (Kingma et al. 2014) ----------------------------------------------


class M2(Model):
    """M2 with labels observed where ``y_mask`` says so:

        y_n ~ Categorical(1/C)          observed where y_mask_n (obs_mask), else the latent y_unobserved
        z_n ~ Normal(0, I)
        x_n ~ Bernoulli(decoder([z_n, embed(y_n)]))
    """

    Config = ConditionalConfig

    def __init__(self, config: ConditionalConfig, data):
        super().__init__(data)
        self.config, self.classes = config, data.num_classes
        self.label_embedding = nn.Embedding(self.classes, 8)  # shared with the guide
        self.decoder = MLP(config.latent_dim + 8, config.hidden, data.x_features)

    @property
    def latent_sites(self):
        return (
            LatentSite("y_unobserved", (), discrete=True, enumerated=True),
            LatentSite("z", (self.config.latent_dim,)),
        )

    def forward(self, x, y, y_mask, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            uniform = x.new_full((self.classes,), 1.0 / self.classes)
            label = pyro.sample("y", dist.Categorical(uniform), obs=y, obs_mask=y_mask)
            z = pyro.sample("z", StandardNormal((x.shape[0],), (self.config.latent_dim,), dtype=x.dtype, device=x.device))
            embedded = self.label_embedding(label)
            lead = torch.broadcast_shapes(z.shape[:-1], embedded.shape[:-1])  # enumeration and particle dims
            features = torch.cat([z.expand(lead + z.shape[-1:]), embedded.expand(lead + embedded.shape[-1:])], -1)
            pyro.sample("x", BernoulliLogits(self.decoder(features)), obs=x)


class M2Guide(Guide):
    """q(y_n | x_n) = Categorical(classifier(x_n)), enumerated where the label is missing;
    q(z_n | x_n, y_n) = Normal(mu(x_n, embed(y_n)), sigma(.)), with the model's label embedding."""

    Config = GuideConfig

    def __init__(self, config: GuideConfig, data, model: M2):
        super().__init__(data)
        sizes = model.config
        self.label_embedding = model.label_embedding  # the model owns it
        self.classifier = MLP(data.x_features, config.hidden, data.num_classes)
        self.encoder = MLP(data.x_features + 8, config.hidden, 2 * sizes.latent_dim)

    def forward(self, x, y, y_mask, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            guess = pyro.sample(
                "y_unobserved",
                dist.Categorical(logits=self.classifier(x)).mask(~y_mask),
                infer={"enumerate": "parallel"},
            )
            label = torch.where(y_mask, y, guess)
            embedded = self.label_embedding(label)
            features = torch.cat([x.expand(embedded.shape[:-1] + x.shape[-1:]), embedded], -1)
            pyro.sample("z", gaussian_head(self.encoder(features)))


# --- Gumbel-softmax (concrete) latents with an annealed temperature -----------------------


@dataclass
class DiscreteConfig:
    groups: int = 4
    categories: int = 5
    hidden: list[int] = field(default_factory=lambda: [64])


class GumbelSoftmaxVAE(Model):
    """Jang et al. 2017 / Maddison et al. 2017, temperature tau a scheduled input:

        z_n ~ RelaxedOneHotCategorical(tau, uniform) over ``groups`` variables of ``categories`` values
        x_n ~ Bernoulli(decoder(flatten(z_n)))
    """

    Config = DiscreteConfig
    scheduled_inputs = {"temperature": 1.0}

    def __init__(self, config: DiscreteConfig, data):
        super().__init__(data)
        self.config = config
        self.decoder = MLP(config.groups * config.categories, config.hidden, data.x_features)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.groups, self.config.categories)),)

    def forward(self, x, temperature, **batch):
        c = self.config
        with pyro.plate("data", x.shape[0], device=x.device):
            uniform = x.new_full((x.shape[0], c.groups, c.categories), 1.0 / c.categories)
            prior = dist.RelaxedOneHotCategorical(x.new_tensor(temperature), probs=uniform).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", BernoulliLogits(self.decoder(z.flatten(-2))), obs=x)


class GumbelSoftmaxGuide(Guide):
    """q(z_n | x_n) = RelaxedOneHotCategorical(tau, softmax(encoder(x_n))) per group."""

    Config = GuideConfig

    scheduled_inputs = {"temperature": 1.0}

    def __init__(self, config: GuideConfig, data, model):
        super().__init__(data)
        sizes = model.config
        self.sizes = sizes
        self.encoder = MLP(data.x_features, config.hidden, sizes.groups * sizes.categories)

    def forward(self, x, temperature, **batch):
        c = self.sizes
        logits = self.encoder(x).reshape(x.shape[0], c.groups, c.categories)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", dist.RelaxedOneHotCategorical(x.new_tensor(temperature), logits=logits).to_event(1))


# --- categorical latents under IWAE (VIMCO) -------------------------------------------------


class CategoricalVAE(Model):
    """Exact categorical latents, trained with score-function gradients (VIMCO under IWAE):

        z_n ~ OneHotCategorical(uniform) over ``groups`` variables of ``categories`` values
        x_n ~ Bernoulli(decoder(flatten(z_n)))
    """

    Config = DiscreteConfig

    def __init__(self, config: DiscreteConfig, data):
        super().__init__(data)
        self.config = config
        self.decoder = MLP(config.groups * config.categories, config.hidden, data.x_features)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.groups, self.config.categories), discrete=True),)

    def forward(self, x, **batch):
        c = self.config
        with pyro.plate("data", x.shape[0], device=x.device):
            uniform = x.new_full((x.shape[0], c.groups, c.categories), 1.0 / c.categories)
            z = pyro.sample("z", dist.OneHotCategorical(probs=uniform).to_event(1))
            pyro.sample("x", BernoulliLogits(self.decoder(z.flatten(-2))), obs=x)


class CategoricalGuide(Guide):
    """q(z_n | x_n) = OneHotCategorical(softmax(encoder(x_n))) per group (no rsample)."""

    Config = GuideConfig

    def __init__(self, config: GuideConfig, data, model):
        super().__init__(data)
        sizes = model.config
        self.sizes = sizes
        self.encoder = MLP(data.x_features, config.hidden, sizes.groups * sizes.categories)

    def forward(self, x, **batch):
        c = self.sizes
        logits = self.encoder(x).reshape(x.shape[0], c.groups, c.categories)
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", dist.OneHotCategorical(logits=logits).to_event(1))


# --- two stochastic layers ------------------------------------------------------------------


@dataclass
class TwoLayerConfig:
    top_dim: int = 2
    bottom_dim: int = 4
    hidden: list[int] = field(default_factory=lambda: [64])


class TwoLayerVAE(Model):
    """Two stochastic layers (per-site beta warms the top one up more slowly):

        z2_n ~ Normal(0, I)
        z1_n ~ Normal(mu(z2_n), sigma(z2_n))
        x_n  ~ Bernoulli(decoder(z1_n))
    """

    Config = TwoLayerConfig

    def __init__(self, config: TwoLayerConfig, data):
        super().__init__(data)
        self.config = config
        self.top = MLP(config.top_dim, config.hidden, 2 * config.bottom_dim)
        self.decoder = MLP(config.bottom_dim, config.hidden, data.x_features)

    @property
    def latent_sites(self):
        return (LatentSite("z2", (self.config.top_dim,)), LatentSite("z1", (self.config.bottom_dim,)))

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            z2 = pyro.sample("z2", StandardNormal((x.shape[0],), (self.config.top_dim,), dtype=x.dtype, device=x.device))
            z1 = pyro.sample("z1", gaussian_head(self.top(z2)))
            pyro.sample("x", BernoulliLogits(self.decoder(z1)), obs=x)


class TwoLayerGuide(Guide):
    """q(z1_n | x_n) = Normal(mu(x_n), sigma(x_n)),  q(z2_n | z1_n) = Normal(mu(z1_n), sigma(z1_n))."""

    Config = GuideConfig

    def __init__(self, config: GuideConfig, data, model):
        super().__init__(data)
        sizes = model.config
        self.bottom = MLP(data.x_features, config.hidden, 2 * sizes.bottom_dim)
        self.top = MLP(sizes.bottom_dim, config.hidden, 2 * sizes.top_dim)

    def forward(self, x, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            z1 = pyro.sample("z1", gaussian_head(self.bottom(x)))
            pyro.sample("z2", gaussian_head(self.top(z1)))


# --- a GRU sequence VAE on variable-length token sequences ----------------------------------


@dataclass
class SequenceConfig:
    latent_dim: int = 4
    embedding_dim: int = 16
    hidden_size: int = 32


class GRUSequenceVAE(Model):
    """Sentence-VAE shape (Bowman et al. 2016) with a GRU, on padded token rows x with ``mask``:

        z_n ~ Normal(0, I)
        h_0 = tanh(W z_n),  h_t = GRU(h_{t-1}, embed(x_{n,t-1}))   (x_{n,-1} = BOS)
        x_{n,t} ~ Categorical(softmax(V h_t))   for t < length_n (masked beyond)
    """

    Config = SequenceConfig

    def __init__(self, config: SequenceConfig, data):
        super().__init__(data)
        self.config, self.vocabulary = config, data.num_categories
        self.embedding = nn.Embedding(self.vocabulary + 1, config.embedding_dim)  # + BOS
        self.initial = nn.Linear(config.latent_dim, config.hidden_size)
        self.gru = nn.GRU(config.embedding_dim, config.hidden_size, batch_first=True)
        self.output = nn.Linear(config.hidden_size, self.vocabulary)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def forward(self, x, mask, **batch):
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", StandardNormal((x.shape[0],), (self.config.latent_dim,), device=x.device))
            logits = self.decode(z, x)
            pyro.sample("x", dist.Categorical(logits=logits).mask(mask).to_event(1), obs=x)

    def decode(self, z, x):
        """Teacher-forced logits for every position; z may carry particle dims on the left."""
        lead = z.shape[:-1]
        bos = x.new_full(x.shape[:-1] + (1,), self.vocabulary)
        inputs = self.embedding(torch.cat([bos, x[..., :-1]], -1))
        inputs = inputs.expand(lead + inputs.shape[-2:]).reshape(-1, *inputs.shape[-2:])
        hidden = torch.tanh(self.initial(z)).reshape(1, -1, self.config.hidden_size)
        outputs, _ = self.gru(inputs, hidden)
        return self.output(outputs).reshape(lead + outputs.shape[-2:-1] + (self.vocabulary,))


class GRUSequenceGuide(Guide):
    """q(z_n | x_n) = Normal(mu(h_n), sigma(h_n)), h_n the GRU state at the last real token."""

    Config = GuideConfig

    def __init__(self, config: GuideConfig, data, model):
        super().__init__(data)
        sizes = model.config
        self.embedding = nn.Embedding(data.num_categories, sizes.embedding_dim)
        self.gru = nn.GRU(sizes.embedding_dim, sizes.hidden_size, batch_first=True)
        self.head = nn.Linear(sizes.hidden_size, 2 * sizes.latent_dim)

    def forward(self, x, lengths, **batch):
        outputs, _ = self.gru(self.embedding(x))
        last = outputs[torch.arange(x.shape[0], device=x.device), lengths - 1]
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", gaussian_head(self.head(last)))


@pyrovae.data_loader
def toy_sequences(count: int = 600, vocabulary: int = 8, max_length: int = 10, seed: int = 0):
    """Variable-length token rows with structure a latent can hold: arithmetic progressions
    ``start, start + step, ...`` modulo ``vocabulary``, of length 3..max_length."""
    from pyrovae.data import sequence_splits

    generator = torch.Generator().manual_seed(seed)

    def rows(n):
        starts = torch.randint(0, vocabulary, (n,), generator=generator)
        steps = torch.randint(1, 3, (n,), generator=generator)
        lengths = torch.randint(3, max_length + 1, (n,), generator=generator)
        return [[(int(s) + t * int(d)) % vocabulary for t in range(int(length))] for s, d, length in zip(starts, steps, lengths)]

    return sequence_splits(
        rows(count), rows(count // 4), validation=0.15, num_categories=vocabulary, max_length=max_length, name="toy_sequences", seed=seed
    )
