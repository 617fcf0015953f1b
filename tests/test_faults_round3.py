"""Fault injection, third round: a config runs no code it was not declared to run, run-folder files are
written atomically and restored from checkpoints, checkpoints are checked against the run folder, and
each bad input or fault gets one line that names it. Every case here failed (or passed silently) before
the fix it tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyrovae
from pyrovae.cli import main
from pyrovae.config import dump_toml, load_toml
from pyrovae.data.splits import split_rows
from pyrovae.errors import ConfigError, DataError
from pyrovae.experiment import Experiment
from pyrovae.registry import DATASETS, GUIDES, LIKELIHOODS, MODELS, OBJECTIVES, SCHEDULES
from tests.conftest import tiny_experiment

ROOT = Path(__file__).resolve().parents[1]


# --- a config names only declared parts --------------------------------------------------------------


@pytest.mark.parametrize(
    "registry, name",
    [
        (DATASETS, "os:system"),
        (MODELS, "os:system"),
        (GUIDES, "builtins:print"),
        (OBJECTIVES, "os:getcwd"),
        (SCHEDULES, "subprocess:run"),
        (LIKELIHOODS, "shutil:rmtree"),
        (MODELS, "torch.nn:Linear"),  # a class, but not a pyrovae.Model
        (GUIDES, "pyrovae.models.vae:GaussianVAE"),  # a model is not a guide
        (DATASETS, "pyrovae.cli:main"),  # pyrovae's own code, but no loader
    ],
)
def test_an_import_path_must_name_a_declared_part_of_its_kind(registry, name):
    with pytest.raises(ConfigError, match=rf"{name!r} is not declared as a pyrovae {registry.kind} .*refused without being called"):
        registry.resolve(name, "[x] name")


def test_declared_parts_and_registered_ones_resolve():
    assert MODELS.resolve("pyrovae.models.vae:GaussianVAE") is MODELS.resolve("vae")
    assert DATASETS.resolve("pyrovae.data.semisupervised:digits").__pyrovae_kind__ == "data set"
    assert DATASETS.resolve("tests.fault_loaders:bad_row").__name__ == "bad_row"
    assert OBJECTIVES.resolve("tests.test_distributed:MeanELBO").__name__ == "MeanELBO"
    with pytest.raises(ValueError, match="unknown part kind 'loader'"):
        pyrovae.declare("loader")


def test_a_run_folder_naming_os_system_runs_nothing(tmp_path, capsys):
    """The issue's case: a crafted config.toml in a run folder names os:system with a command."""
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "experiments" / "quickstart.toml"), "--out", str(run), "--no-progress", "--set", "train.epochs=1"]) == 0
    marker = tmp_path / "pwned"
    text = (run / "config.toml").read_text()
    head, _, rest = text.partition("[data]\n")
    rest = rest.split("\n[", 1)[1]
    (run / "config.toml").write_text(f'{head}[data]\nname = "os:system"\ncommand = "touch {marker}"\n\n[{rest}')
    capsys.readouterr()
    for command in (["evaluate", str(run)], ["sample", str(run)], ["analyze", str(run)], ["train", str(tmp_path / "exp.toml")]):
        if command[0] == "train":
            (tmp_path / "exp.toml").write_text((run / "config.toml").read_text())
        assert main([*command, "--no-progress"] if command[0] in ("evaluate", "analyze", "train") else command) == 2
        error = capsys.readouterr().err
        assert "'os:system' is not declared as a pyrovae data set" in error and "Traceback" not in error
        assert not marker.exists(), f"{command[0]} ran the command"


# --- split sizes name their key and refuse the ambiguous ---------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"validation": 1.0}, ConfigError, r"data.validation = 1.0 is ambiguous: .*\(data.validation = 1\)"),
        ({"validation": -0.1}, ConfigError, r"data.validation = -0.1 is not allowed: give a fraction in \(0, 1\)"),
        ({"validation": 1.5}, ConfigError, r"data.validation = 1.5 is not allowed"),
        ({"test": 1.5}, ConfigError, r"data.test = 1.5 is not allowed"),
        ({"test": 1.0}, ConfigError, r"data.test = 1.0 is ambiguous"),
        ({"test": 0}, (ConfigError, DataError), r"data.test = 0.0 holds out no rows"),
        ({"validation": 5000}, (ConfigError, DataError), r"data.validation = 5000 holds out 5000 of the 1438 rows and leaves none for training"),
        ({"validation": "10%"}, ConfigError, r"validation"),
    ],
)
def test_split_sizes_name_the_right_key_and_reason(change, error, message):
    with pytest.raises(error, match=message):
        Experiment.from_config(tiny_experiment(data={"name": "digits", **change}))


def test_split_rows_reads_fractions_and_counts():
    assert split_rows(0.1, 1000, "validation") == 100
    assert split_rows(7, 1000, "validation") == 7
    assert split_rows(0, 1000, "validation") == 0


# --- run files: atomic, kept in checkpoints, restored -----------------------------------------------


def _train(tmp_path, name="run", **changes):
    run = tmp_path / name
    Experiment.from_config(tiny_experiment(train={"epochs": 2}, **changes)).train(run, progress=False)
    return run


def _run_cli(capsys, *arguments):
    capsys.readouterr()
    code = main([*arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("damage", ["truncate", "empty", "cut", "delete"])
def test_a_damaged_or_deleted_config_is_restored_from_the_checkpoint(tmp_path, capsys, damage):
    run = _train(tmp_path)
    original = (run / "config.toml").read_text()
    if damage == "truncate":  # invalid TOML
        (run / "config.toml").write_text(original[: len(original) // 2].rsplit("=", 1)[0] + "= [")
    elif damage == "empty":  # valid TOML, nothing in it
        (run / "config.toml").write_text("")
    elif damage == "cut":  # valid TOML cut short at a line end
        (run / "config.toml").write_text(original[:200].rsplit("\n", 1)[0] + "\n")
    else:
        (run / "config.toml").unlink()
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--no-progress", "--particles", "2")
    assert code == 0, err
    assert f"{run / 'config.toml'} was {'missing' if damage == 'delete' else 'damaged'}" in err and "restored it from" in err
    assert (run / "config.toml").read_text() == original
    (run / "config.toml").unlink()
    exp = tmp_path / "exp.toml"
    exp.write_text(original.replace("epochs = 2", "epochs = 3"))
    code, out, err = _run_cli(capsys, "train", str(exp), "--out", str(run), "--resume", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["epochs"] == 3


def test_the_run_files_are_kept_in_every_checkpoint(tmp_path):
    run = _train(tmp_path)
    saved = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["run_files"]["config.toml"] == (run / "config.toml").read_text()
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".*.tmp"))


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    from pyrovae import files
    from pyrovae.errors import FileWriteError

    target = tmp_path / "config.toml"
    target.write_text("seed = 0\n")

    def no_space(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(FileWriteError, match=r"cannot write .*config.toml \(No space left on device; is the disk full\?\); config.toml as it was is intact"):
        files.write_text_atomically(target, "seed = 1\n")
    assert target.read_text() == "seed = 0\n" and not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path):
    """``ulimit -f``: the checkpoint write fails (EFBIG, as a full disk would); config.toml, written
    first and small, is whole."""
    exp = tmp_path / "exp.toml"
    exp.write_text(dump_toml(tiny_experiment(model={"hidden": [256]}, guide={"hidden": [256]}, train={"epochs": 1})))
    limit = "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000)); "
    code = f"{limit}from pyrovae.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "train", str(exp), "--out", str(tmp_path / "run"), "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines and "Traceback" not in result.stderr
    assert "cannot write" in lines[-1] and "is the disk full?" in lines[-1], result.stderr
    assert "checkpoints/best.pt" in lines[-1] or "checkpoints/latest.pt" in lines[-1], result.stderr
    assert load_toml(tmp_path / "run" / "config.toml")["seed"] == 0  # whole
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


# --- checkpoints checked against the run folder -----------------------------------------------------


def test_a_checkpoint_from_another_run_is_refused_by_name(tmp_path, capsys):
    other = _train(tmp_path, "other", seed=3)
    run = _train(tmp_path, "run")
    history = (run / "metrics.jsonl").read_text()
    for name in ("latest.pt", "latest.prev.pt"):
        (run / "checkpoints" / name).write_bytes((other / "checkpoints" / name).read_bytes())
    exp = tmp_path / "exp.toml"
    exp.write_text((run / "config.toml").read_text().replace("epochs = 2", "epochs = 4"))
    code, out, err = _run_cli(capsys, "train", str(exp), "--out", str(run), "--resume", "--no-progress")
    assert code == 2
    assert "was written by another experiment: it differs from the run folder's config.toml in seed (3 there, 0 here)" in err
    assert (run / "metrics.jsonl").read_text() == history, "the other run's history replaced this run's"
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--checkpoint", "latest", "--no-progress")
    assert code == 2 and "latest.pt was written by another experiment" in err


@pytest.mark.parametrize(
    "damage, message",
    [
        ("list", r"holds a list, not a pyrovae checkpoint"),
        ("no state", r"has no 'state' entry; it was not written by pyrovae train"),
        ("nan", r"holds non-finite parameters \(model decoder"),
        ("extra key", r"does not fit this model \(GaussianVAE\): Unexpected key\(s\) in state_dict: \"surplus\""),
        ("missing key", r"does not fit this guide \(DiagonalNormalGuide\): Missing key\(s\) in state_dict"),
        ("other size", r"does not fit this model \(GaussianVAE\): size mismatch for decoder"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys, damage, message):
    run = _train(tmp_path)
    path = run / "checkpoints" / "best.pt"
    saved = torch.load(path, weights_only=True)
    saved.pop("fingerprint")  # as a hand-made file would: the fit checks themselves must name it
    if damage == "list":
        saved = [1, 2, 3]
    elif damage == "no state":
        del saved["state"]
    elif damage == "nan":
        saved["model"] = {name: torch.full_like(value, float("nan")) for name, value in saved["model"].items()}
    elif damage == "extra key":
        saved["model"]["surplus"] = torch.zeros(2)
    elif damage == "missing key":
        saved["guide"].pop(next(iter(saved["guide"])))
    else:
        key = next(name for name in saved["model"] if name.startswith("decoder") and name.endswith("weight"))
        saved["model"][key] = torch.zeros(3, 3)
    torch.save(saved, path)
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--no-progress", "--particles", "2")
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err


def _corpus(folder: Path, extra: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    words = ["the cat sat", "a dog ran far", "the bird sang", "one fish swam", "cats and dogs"]
    lines = [f"{words[i % 5]} {words[(i * 3) % 5]}" for i in range(200)]
    (folder / "corpus.txt").write_text("\n".join(lines) + ("\n" + extra if extra else "") + "\n")
    return folder / "corpus.txt"


TEXT = {
    "model": {"name": "sentence_vae", "embedding_dim": 8, "hidden": 16, "latent_dim": 2},
    "guide": {"name": "sentence_lstm", "embedding_dim": 8, "hidden": 16},
    "objective": {"name": "elbo"},
    "evaluate": {"particles": 2},
}


def test_a_deleted_vocabulary_is_restored_and_another_vocabulary_refused(tmp_path, capsys):
    corpus = _corpus(tmp_path / "data")
    run = tmp_path / "run"
    config = tiny_experiment(data={"name": "text", "file": str(corpus)}, train={"epochs": 1, "batch_size": 32}, **TEXT)
    Experiment.from_config(config).train(run, progress=False)
    vocabulary = (run / "vocabulary.json").read_text()
    (run / "vocabulary.json").unlink()
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--no-progress", "--particles", "2")
    assert code == 0 and "vocabulary.json was missing; restored it from" in err, err
    assert (run / "vocabulary.json").read_text() == vocabulary
    # The data change (new words): the resume is refused although vocabulary.json is deleted.
    (run / "vocabulary.json").unlink()
    _corpus(tmp_path / "data", extra="zebra quokka wombat " * 3)
    exp = tmp_path / "exp.toml"
    exp.write_text((run / "config.toml").read_text().replace("epochs = 1", "epochs = 2"))
    code, out, err = _run_cli(capsys, "train", str(exp), "--out", str(run), "--resume", "--no-progress")
    assert code == 2 and "vocabulary" in err and "differs" in err, err
    # A vocabulary.json one token short: one line naming the vocabulary.
    record = json.loads(vocabulary)
    record["tokens"] = record["tokens"][:-1]
    (run / "vocabulary.json").write_text(json.dumps(record))
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--no-progress", "--particles", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "vocabulary" in err, err


# --- a run folder deleted while training ------------------------------------------------------------


@pytest.mark.parametrize("remake", [False, True])
def test_a_run_folder_deleted_while_training_stops_in_one_line(tmp_path, remake):
    import shutil

    from pyrovae.errors import RunFolderLostError
    from pyrovae.objectives import ELBO

    run = tmp_path / "run"

    class Deleting(ELBO):
        calls = 0

        def __call__(self, model, guide, batch):
            if torch.is_grad_enabled():
                Deleting.calls += 1
                if Deleting.calls == 3 and run.exists():
                    shutil.rmtree(run)
                    if remake:
                        run.mkdir()
            return super().__call__(model, guide, batch)

    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 2}))
    experiment.objective = Deleting()
    with pytest.raises(RunFolderLostError, match="was deleted" + (" and made anew" if remake else " while this run trained")):
        experiment.train(run, progress=False)
    assert not (run / "checkpoints").exists(), "the lost folder was written into"


# --- one line for what the settings do, and for what cannot fit ------------------------------------


def test_a_model_too_large_for_memory_is_refused_before_building():
    with pytest.raises(ConfigError, match=r"training needs about 160 GB .* the largest is model.decoder.0.weight \(100000, 100000\)"):
        Experiment.from_config(tiny_experiment(model={"latent_dim": 100000, "hidden": [100000]}))


def test_settings_that_are_accepted_say_what_they_do(tmp_path, capsys):
    experiment = Experiment.from_config(tiny_experiment(model={"hidden": []}, train={"batch_size": 5000, "epochs": 1}))
    notes = experiment.setting_notes()
    assert any("train.batch_size = 5000 is more than the 1294 training rows: each epoch is one batch of 1294" in note for note in notes), notes
    assert "model.hidden = []: no hidden layer, so that network is one linear map" in notes
    experiment.train(tmp_path / "run", progress=False)
    assert "no hidden layer" in capsys.readouterr().err


def test_a_nonfinite_stop_after_an_epoch_advises_resuming(tmp_path):
    from pyrovae.errors import NonFiniteLossError
    from tests.test_train import FlakyELBO

    experiment = Experiment.from_config(tiny_experiment(train={"epochs": 3, "max_nonfinite_retries": 1}))
    steps = experiment.data.size("train") // 128 + 1
    experiment.objective = FlakyELBO(set(range(steps + 2, steps + 40)))
    with pytest.raises(NonFiniteLossError, match=r"checkpoints/latest.pt holds epoch 1: resume from it .* --resume --set train.lr="):
        experiment.train(tmp_path / "run", progress=False)


def test_reading_a_run_that_is_training_says_the_checkpoint_may_be_older(tmp_path, capsys):
    from filelock import FileLock

    run = _train(tmp_path)
    lock = FileLock(str(run / ".pyrovae.lock"))
    lock.acquire(timeout=0)  # as a training process would hold it
    try:
        code, out, err = _run_cli(capsys, "evaluate", str(run), "--no-progress", "--particles", "2")
    finally:
        lock.release()
    assert code == 0
    assert "is training now (another process holds its lock); this reads best.pt as of epoch" in err
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--no-progress", "--particles", "2")
    assert "training now" not in err


def test_the_readme_says_what_a_run_folder_can_still_run():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("#### Run folders and experiments are code", 1)[1].split("\n## ", 1)[0]
    assert "before anything is called" in section and "os:system" in section
    assert "importing a" in section and "trust_remote_code" in section and "@pyrovae.data_loader" in section


def test_a_damaged_best_checkpoint_points_at_latest_and_both_damaged_copies_are_named(tmp_path, capsys):
    run = _train(tmp_path)
    best, previous = run / "checkpoints" / "best.pt", run / "checkpoints" / "best.prev.pt"
    best.write_bytes(best.read_bytes()[:100])
    previous.unlink(missing_ok=True)
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--no-progress", "--particles", "2")
    assert code == 2 and "evaluate, sample or analyze it with --checkpoint latest" in err, err
    (run / "checkpoints" / "latest.prev.pt").write_bytes(b"")
    (run / "checkpoints" / "latest.pt").write_bytes(b"")
    code, out, err = _run_cli(capsys, "evaluate", str(run), "--checkpoint", "latest", "--no-progress")
    assert code == 2 and "latest.pt is damaged" in err and "and so is its previous copy" in err and "latest.prev.pt" in err, err
