"""Text experiments end to end through the CLI: the reviews TOMLs build, a run keeps its vocabulary,
``evaluate`` and ``sample`` rebuild the data with it, and ``final.json`` holds the collapse signals."""

import json
import math
import tomllib
from pathlib import Path

import pytest

from pyrovae.cli import main
from pyrovae.config import apply_overrides, dump_toml, resolve_paths
from pyrovae.data.text import Vocabulary
from pyrovae.experiment import Experiment

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
REVIEW_TOMLS = sorted(EXPERIMENTS.glob("reviews_*.toml"))

WORDS = "the dress fits well and the fabric is soft but the color runs small so i returned it".split()


def write_corpus(folder: Path, sentences: int = 120, seed: int = 0) -> Path:
    """A tiny corpus in the reviews layout: train.tsv / valid.tsv / test.tsv with a header
    ``rating<TAB>class<TAB>text``, one review a line."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", sentences), ("valid", 30), ("test", 30)):
        lines = [f"{rng.randint(1, 5)}\tDresses\t" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(count)]
        (folder / f"{name}.tsv").write_text("rating\tclass\ttext\n" + "\n".join(lines) + "\n")
    return folder


def small_text_experiment(toml: Path, corpus: Path) -> dict:
    """The experiment of ``toml`` on the tiny corpus, with small networks and a short run."""
    raw = tomllib.loads(toml.read_text())
    raw["data"] = {"name": "reviews", "dir": str(corpus), "max_length": 12}
    for part in ("model", "guide"):
        for key, value in (("embedding_dim", 16), ("hidden", 16), ("channels", 16), ("latent_dim", 4)):
            if key in raw[part]:
                raw[part][key] = value
    raw["train"].update(epochs=1, batch_size=32)
    if raw["train"].get("strategy") == "aggressive":
        raw["train"]["aggressive_mi_examples"] = 30
    raw["evaluate"].update(particles=min(raw["evaluate"]["particles"], 5), test_examples=20, batch_size=10)
    return raw


@pytest.mark.parametrize("toml", REVIEW_TOMLS, ids=[path.stem for path in REVIEW_TOMLS])
def test_every_reviews_experiment_trains_evaluates_and_samples_on_a_small_corpus(toml, tmp_path, capsys):
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(small_text_experiment(toml, write_corpus(tmp_path / "corpus"))))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)
    assert final["test_tokens"] > 20 and math.isfinite(final["test_perplexity"]) and final["test_perplexity"] > 1
    assert (run / "vocabulary.json").exists() and (run / "samples.txt").exists()
    if "sentence_vae" in toml.read_text():
        assert 0 <= final["test_active_units"] <= 4 and math.isfinite(final["test_mutual_information"])
    assert main(["sample", str(run), "--out", str(tmp_path / "more.txt"), "--count", "3"]) == 0, capsys.readouterr().err
    text = (tmp_path / "more.txt").read_text()
    assert set(text.split()) & set(WORDS)


def test_evaluate_and_sample_use_the_runs_vocabulary_even_when_the_corpus_changed(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(small_text_experiment(EXPERIMENTS / "reviews_vae.toml", corpus)))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    first = json.loads(capsys.readouterr().out)
    saved = Vocabulary.load(run / "vocabulary.json")
    # New words in the training file would change a rebuilt vocabulary: the run keeps its own.
    with (corpus / "train.tsv").open("a") as file:
        file.write("3\tDresses\t" + "zebra " * 5 + "\n" + "4\tDresses\t" + "quokka " * 5 + "\n")
    experiment = Experiment.from_run(run)
    assert experiment.data.vocabulary == saved
    assert main(["evaluate", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    again = json.loads(capsys.readouterr().out)
    assert again["test_elbo"] == pytest.approx(first["test_elbo"], rel=1e-5)
    assert main(["analyze", str(run), "--samples", "30", "--no-progress"]) == 0, capsys.readouterr().err
    assert (run / "analysis" / "posterior.nc").exists() and (run / "analysis" / "report.md").exists()
    capsys.readouterr()
    # A resume must train on the vocabulary the run began with: a changed one is refused.
    assert main(["train", str(path), "--out", str(run), "--resume", "--set", "train.epochs=2", "--no-progress"]) == 2
    assert "vocabulary" in capsys.readouterr().err


@pytest.mark.skipif(not (EXPERIMENTS.parent.parent / "shared" / "data" / "reviews").exists(), reason="needs ../shared/data/reviews")
def test_the_reviews_experiments_resolve_against_the_real_corpus():
    raw = resolve_paths(apply_overrides(tomllib.loads(REVIEW_TOMLS[0].read_text()), ["data.limit=200"]), EXPERIMENTS)
    experiment = Experiment.from_config(raw)
    assert experiment.data.spec.num_categories == len(experiment.data.vocabulary) <= 5000
    assert experiment.data.spec.x_shape == (40,)
    assert experiment.data.size("test") == 2000
