"""The command line end to end on the built-in digits data, including a SIGKILL and --resume."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from pyrovae.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"


def test_train_evaluate_sample_on_digits(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    code = main(["train", str(QUICKSTART), "--out", str(run), "--set", "train.epochs=3", "--set", "evaluate.particles=50", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    final = json.loads((run / "final.json").read_text())
    assert printed == final
    assert final["particles"] == 50 and final["test_examples"] == 359
    # log p(x) >= ELBO up to Monte Carlo error, and both are finite negative numbers of nats.
    assert final["test_log_likelihood"] > final["test_elbo"] - 0.5
    assert -60 < final["test_elbo"] < 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"train/elbo", "valid/elbo", "valid/kl/z", "beta", "lr"} <= set(records[0])
    resolved = tomllib.loads((run / "config.toml").read_text())
    assert resolved["train"]["epochs"] == 3 and resolved["model"]["latent_dim"] == 8 and resolved["guide"]["name"] == "diag_normal"
    assert (run / "checkpoints" / "latest.pt").exists() and (run / "checkpoints" / "best.pt").exists()
    assert (run / "samples.png").stat().st_size > 1000 and (run / "curves.png").stat().st_size > 1000

    assert main(["evaluate", str(run), "--particles", "20", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["particles"] == 20
    assert evaluated["test_elbo"] == pytest.approx(final["test_elbo"], abs=0.5)

    png = tmp_path / "grid.png"
    assert main(["sample", str(run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["sample", str(run), "--out", str(tmp_path / "grid.txt")]) == 2  # one line, no matplotlib traceback
    assert "grid.txt: a picture is written as" in capsys.readouterr().err and not (tmp_path / "grid.txt").exists()

    # The run folder itself is the experiment of a resume: one more epoch, in the same folder.
    assert main(["train", str(run), "--no-progress"]) == 2
    assert "is a run folder: continue it with `pyrovae train" in capsys.readouterr().err
    assert main(["train", str(run), "--resume", "--set", "train.epochs=4", "--set", "evaluate.particles=20", "--no-progress"]) == 0
    capsys.readouterr()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert main(["train", str(tmp_path), "--resume"]) == 2
    assert "is a folder, not an experiment TOML file" in capsys.readouterr().err
    # The same with --nproc: checked here, then handed to torchrun (not started: Popen is replaced).
    started = []

    class NotStarted:
        def __init__(self, command):
            started.append(command)

        def wait(self):
            return 0

    import pyrovae.cli

    monkeypatch.setattr(pyrovae.cli.subprocess, "Popen", NotStarted)
    assert main(["train", str(run), "--resume", "--nproc", "2", "--set", "train.epochs=5"]) == 0
    assert started and started[0][-5:] == ["train", str(run), "--resume", "--set", "train.epochs=5"]


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys):
    code = main(["train", str(QUICKSTART), "--out", str(tmp_path), "--set", "model.latent_dim=big"])
    assert code == 2
    assert "error: [model] latent_dim = 'big': expected an integer" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2


def test_sigkill_then_resume_continues_from_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "pyrovae.cli", "train", str(QUICKSTART), "--out", str(run), "--no-progress",
               "--set", "train.epochs=400", "--set", "evaluate.particles=10"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    # Whatever instant the kill hit, the checkpoint is whole (atomic replace) and loads.
    from pyrovae.train import load_checkpoint

    saved = load_checkpoint(run / "checkpoints" / "latest.pt")
    killed_at = saved["state"]["epoch"]
    assert 5 <= killed_at < 400
    # A kill during a write may leave the temporary file beside the intact target; --resume removes it.

    finish = subprocess.run(command[:-4] + ["--set", f"train.epochs={killed_at + 3}", "--set", "evaluate.particles=10", "--resume"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert not list((run / "checkpoints").glob(".*.tmp")) and not list(run.glob(".*.tmp"))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, killed_at + 4))
    assert json.loads((run / "final.json").read_text())["epochs"] == killed_at + 3


def test_console_script_is_installed():
    result = subprocess.run(["pyrovae", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout and "evaluate" in result.stdout
