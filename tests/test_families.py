"""Every family trains end to end through the CLI on small data (digits, toy sequences), then
runs ``evaluate`` and ``sample``: the pairs in ``tests/families.py``, written as users would."""

import json
import math
from pathlib import Path

import pytest

from pyrovae.cli import main
from pyrovae.config import dump_toml


def run_family(
    tmp_path: Path,
    capsys,
    model: str,
    guide: str,
    *,
    model_options: dict | None = None,
    data: dict | None = None,
    epochs: int = 3,
    sample_name: str = "samples.png",
    **tables,
) -> tuple[dict, list[dict], Path]:
    """Write the experiment as TOML, then train -> evaluate -> sample through the CLI; returns
    final.json, the metrics.jsonl records and the run folder."""
    experiment = {
        "seed": 0,
        "data": data or {"name": "digits"},
        "model": {"name": f"tests.families:{model}", **(model_options or {})},
        "guide": {"name": f"tests.families:{guide}"},
        **tables,
        "train": {"epochs": epochs, "batch_size": 128, "lr": 3e-3},
        "evaluate": {"particles": 10, "test_examples": 100},
    }
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(experiment))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == list(range(1, epochs + 1))
    for key, value in final.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
    assert main(["evaluate", str(run), "--particles", "5", "--no-progress"]) == 0, capsys.readouterr().err
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["particles"] == 5 and math.isfinite(evaluated["test_log_likelihood"])
    out = tmp_path / sample_name
    assert main(["sample", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 100
    return final, records, run


def test_conditional_vae_with_a_prior_network(tmp_path, capsys):
    final, records, _ = run_family(
        tmp_path,
        capsys,
        "ConditionalVAE",
        "ConditionalGuide",
    )
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    # log p(x | y) >= ELBO, up to Monte Carlo error.
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5


def test_gumbel_softmax_vae_with_an_annealed_temperature(tmp_path, capsys):
    final, records, _ = run_family(
        tmp_path,
        capsys,
        "GumbelSoftmaxVAE",
        "GumbelSoftmaxGuide",
        schedules={"temperature": {"name": "exponential_decay", "rate": 0.02, "initial": 1.0, "minimum": 0.5}},
    )
    temperatures = [record["schedule/temperature"] for record in records]
    steps = [record["step"] for record in records]
    assert temperatures == pytest.approx([max(0.5, math.exp(-0.02 * step)) for step in steps])
    assert temperatures[0] > temperatures[-1]
    assert final["schedule/temperature"] == pytest.approx(temperatures[-1])


def test_categorical_latents_under_iwae_use_vimco_and_do_not_collapse(tmp_path, capsys):
    final, records, _ = run_family(
        tmp_path,
        capsys,
        "CategoricalVAE",
        "CategoricalGuide",
        model_options={"groups": 4, "categories": 5},
        objective={"name": "iwae", "particles": 4},
        epochs=4,
    )
    assert records[-1]["valid/iwae"] > records[0]["valid/iwae"]
    # A guide trained without the score-function term collapses to a point mass: KL = 4 ln 5.
    assert final["test_kl/z"] < 0.95 * 4 * math.log(5)
    assert final["test_iwae"] >= final["test_elbo"]


def test_two_layer_model_with_per_site_beta_from_toml(tmp_path, capsys):
    final, records, _ = run_family(
        tmp_path,
        capsys,
        "TwoLayerVAE",
        "TwoLayerGuide",
        anneal={"name": "linear", "warmup_steps": 10, "sites": {"z2": {"name": "linear", "warmup_steps": 60}}},
    )
    for record in records:
        assert record["beta"] == pytest.approx(min(1.0, record["step"] / 10))
        assert record["beta/z2"] == pytest.approx(min(1.0, record["step"] / 60))
    assert {"test_kl/z1", "test_kl/z2"} <= set(final)


def test_gru_sequence_vae_on_variable_length_token_rows(tmp_path, capsys):
    final, records, run = run_family(
        tmp_path,
        capsys,
        "GRUSequenceVAE",
        "GRUSequenceGuide",
        data={"name": "tests.families:toy_sequences"},
        epochs=4,
        sample_name="samples.json",
    )
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"] + 1.0
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5
    # Uniform guessing costs ln 8 per token; the model must beat it.
    from tests.families import toy_sequences

    tokens_per_row = float(toy_sequences().test["lengths"][: final["test_examples"]].float().mean())
    assert -final["test_log_likelihood"] < 0.8 * tokens_per_row * math.log(8)
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert all(0 <= token < 8 for row in samples["prior_samples"] for token in row)
    assert (run / "samples.json").exists()


def test_m2_semi_supervised_with_enumerated_labels(tmp_path, capsys):
    final, records, _ = run_family(
        tmp_path,
        capsys,
        "M2",
        "M2Guide",
        data={"name": "digits", "labels_per_class": 20},
        objective={"name": "enum_elbo"},
    )
    assert records[-1]["valid/elbo"] > records[0]["valid/elbo"]
    # The label is summed out exactly: KL(q(y | x) || p(y)) lies in [0, ln 10].
    assert 0.0 <= final["test_kl/y_unobserved"] <= math.log(10) + 1e-4
    # log p(x) (labels summed out exactly, z importance-sampled) >= the ELBO, up to Monte Carlo error.
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5
