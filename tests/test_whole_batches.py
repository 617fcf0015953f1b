"""Whole batches everywhere: training, validation, test metrics, the log-likelihood, `evaluate` and
`sample` pass every key the loader gives (labels, lengths ...) to the model and the guide. Data that
are not images get their samples as JSON."""

import pyrovae
import json
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import DataSpec, Guide, LatentSite, Model
from pyrovae.cli import main
from pyrovae.data import make_splits
from pyrovae.nn import MLP

ROOT = Path(__file__).resolve().parents[1]


def write_experiment(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CONDITIONAL_TOML = """
seed = 0
[data]
name = "digits"
[model]
name = "tests.test_parameter_groups:ConditionalVAE"
latent_dim = 4
[guide]
name = "tests.test_parameter_groups:ConditionalGuide"
[objective]
name = "iwae"
particles = 3
[train]
epochs = 2
lr = 3e-3
[evaluate]
particles = 10
test_examples = 60
"""


def test_a_conditional_model_survives_train_evaluate_and_sample_from_the_cli(tmp_path, capsys):
    """The model and guide both read labels y: every stage must hand them the whole batch."""
    experiment = write_experiment(tmp_path / "conditional.toml", CONDITIONAL_TOML)
    run = tmp_path / "run"
    assert main(["train", str(experiment), "--out", str(run), "--no-progress"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["test_examples"] == 60 and final["test_log_likelihood"] > final["test_iwae"] - 1.0
    assert (run / "samples.png").stat().st_size > 1000
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["particles"] == 5
    assert main(["sample", str(run), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # JSON on request, even for images.
    assert main(["sample", str(run), "--out", str(tmp_path / "rows.json"), "--count", "3"]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows["prior_samples"]) == len(rows["test_rows"]) == len(rows["reconstructions"]) == 3


VOCABULARY, LENGTH = 5, 6


@pyrovae.data_loader
def tokens(seed: int = 0, validation: int = 20):
    """Integer token rows of varying length (padding 0 after ``lengths``): data that are not images.
    Row n repeats the token n % VOCABULARY up to its length."""
    generator = torch.Generator().manual_seed(seed)

    def rows(count):
        lengths = torch.randint(2, LENGTH + 1, (count,), generator=generator)
        tokens = (torch.arange(count) % VOCABULARY).unsqueeze(-1).expand(count, LENGTH).clone()
        tokens[torch.arange(LENGTH) >= lengths.unsqueeze(-1)] = 0
        return {"x": tokens, "lengths": lengths}

    spec = DataSpec("tokens", (LENGTH,), "categorical", num_categories=VOCABULARY)
    return make_splits(spec, rows(120), rows(30), validation=validation, binarize="none", seed=seed)


@dataclass
class TokenConfig:
    latent_dim: int = 3
    hidden: list[int] = field(default_factory=lambda: [16])


class TokenVAE(Model):
    """z_n ~ Normal(0, I),  x_{n,t} ~ Categorical(softmax(decoder(z_n)_t)) for t < lengths_n
    (positions past the length are masked out of the likelihood)."""

    Config = TokenConfig

    def __init__(self, config, data):
        super().__init__(data)
        self.config = config
        self.decoder = MLP(config.latent_dim, config.hidden, LENGTH * VOCABULARY)

    @property
    def latent_sites(self):
        return (LatentSite("z", (self.config.latent_dim,)),)

    def forward(self, x, lengths, **batch):
        mask = torch.arange(LENGTH, device=x.device) < lengths.unsqueeze(-1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], self.config.latent_dim), 1.0).to_event(1))
            logits = self.decoder(z).reshape(z.shape[:-1] + (LENGTH, VOCABULARY))  # particles, if any
            pyro.sample("x", dist.Categorical(logits=logits).mask(mask).to_event(1), obs=x)


class TokenGuide(Guide):
    """q(z | x) = Normal(mu(h), sigma(h)),  h = mean over t < lengths of embedding(x_t)."""

    Config = TokenConfig

    def __init__(self, config, data, model):
        super().__init__(data)
        self.embedding = nn.Embedding(VOCABULARY, 8)
        self.head = MLP(8, config.hidden, 2 * model.config.latent_dim)

    def forward(self, x, lengths, **batch):
        mask = (torch.arange(LENGTH) < lengths.unsqueeze(-1)).float().unsqueeze(-1)
        pooled = (self.embedding(x) * mask).sum(1) / mask.sum(1)
        loc, raw = self.head(pooled).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


TOKENS_TOML = """
seed = 0
[data]
name = "tests.test_whole_batches:tokens"
[model]
name = "tests.test_whole_batches:TokenVAE"
[guide]
name = "tests.test_whole_batches:TokenGuide"
[train]
epochs = 3
batch_size = 32
lr = 1e-2
[evaluate]
particles = 5
"""


def test_sample_writes_integer_rows_for_token_data(tmp_path, capsys):
    experiment = write_experiment(tmp_path / "tokens.toml", TOKENS_TOML)
    run = tmp_path / "run"
    assert main(["train", str(experiment), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert not (run / "samples.png").exists()
    written = json.loads((run / "samples.json").read_text())
    assert main(["sample", str(run), "--checkpoint", "latest", "--count", "4"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "samples.json")
    samples = json.loads((run / "samples.json").read_text())
    assert len(written["test_rows"]) == 16 and len(samples["test_rows"]) == 4
    assert samples["values"] == "integer draws from p(x | z)"
    splits = tokens()
    for row, x, length in zip(samples["test_rows"], splits.test["x"], splits.test["lengths"]):
        assert row == x[:length].tolist()  # the data rows, cut to their lengths
    for key in ("prior_samples", "reconstructions"):
        assert [len(row) for row in samples[key]] == splits.test["lengths"][:4].tolist()
        assert all(isinstance(token, int) and 0 <= token < VOCABULARY for row in samples[key] for token in row)
    assert main(["sample", str(run), "--out", str(tmp_path / "no.png")]) == 2
    assert "has no image shape" in capsys.readouterr().err


def test_a_limit_smaller_than_a_batch_is_honoured():
    data = tokens()
    batches = list(data.batches("test", 100, limit=7))
    assert [int(batch["x"].shape[0]) for batch in batches] == [7]
    assert all(int(value.shape[0]) == 7 for value in batches[0].values())
