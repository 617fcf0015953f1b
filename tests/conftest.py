from pathlib import Path

import pytest
import torch

import pyrovae  # noqa: F401
from pyrovae.guides import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.models import GaussianVAE, GaussianVAEConfig
from pyrovae.pair import DataSpec

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_pair(features=12, latent_dim=3, hidden=(16,), likelihood="bernoulli", **model_options):
    spec = DataSpec("tiny", (features,), "binary" if likelihood == "bernoulli" else "real")
    model = GaussianVAE(GaussianVAEConfig(latent_dim=latent_dim, hidden=list(hidden), likelihood=likelihood, **model_options), spec)
    guide = DiagonalNormalGuide(DiagonalNormalGuideConfig(hidden=list(hidden)), spec, model)
    return model, guide


def grads(*modules):
    """All parameter gradients of ``modules``, flattened into one vector."""
    return torch.cat([p.grad.flatten() for m in modules for p in m.parameters()])


def zero(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


@pytest.fixture
def binary_batch():
    generator = torch.Generator().manual_seed(0)
    return {"x": torch.bernoulli(torch.full((32, 12), 0.3), generator=generator)}


def tiny_experiment(**overrides):
    """A digits experiment small enough for unit tests (a few seconds)."""
    config = {
        "seed": 0,
        "data": {"name": "digits"},
        "model": {"name": "vae", "latent_dim": 4, "hidden": [32]},
        "guide": {"name": "diag_normal", "hidden": [32]},
        "objective": {"name": "elbo"},
        "train": {"epochs": 3, "batch_size": 128, "lr": 3e-3},
        "evaluate": {"particles": 20},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and values.get("name", config.get(section, {}).get("name")) != config.get(section, {}).get("name"):
            config[section] = dict(values)  # another part: its own keys only
        elif isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


def train_with_the_cli(tmp_path, experiment: dict, capsys, name: str = "experiment.toml"):
    """Write ``experiment`` as a TOML file, ``pyrovae train`` it into ``tmp_path / "run"`` and return
    (run folder, final.json as printed, the metrics.jsonl records)."""
    import json

    from pyrovae.cli import main
    from pyrovae.config import dump_toml

    path = tmp_path / name
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, final, records
