"""pyrovae sweep: the points, a sweep killed and run again (finished points skipped, interrupted ones
resumed), the summary against the run folders, and evaluate on a point's folder."""

from __future__ import annotations

import csv
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_experiment

from pyrovae.cli import main
from pyrovae.config import dump_toml
from pyrovae.errors import ConfigError
from pyrovae.sweeps import Sweep, parse_grid, parse_seeds, split_values, status, resolved, summarize

ROOT = Path(__file__).resolve().parents[1]


def test_seeds_and_grid_values_are_read_as_written():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,3,7") == [0, 3, 7]
    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    for wrong in ("a", "3-1", "0,0", "1-"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(wrong)
    assert split_values('[16,32],[64],"a,b"') == ["[16,32]", "[64]", '"a,b"']
    assert parse_grid(["train.lr=1e-3,3e-4", "model.hidden=[16,32],[64]"]) == [
        ("train.lr", ["1e-3", "3e-4"]),
        ("model.hidden", ["[16,32]", "[64]"]),
    ]
    for wrong in (["train.lr"], ["train.lr=1,,2"], ["a=1", "a=2"]):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(wrong)


def test_the_cross_product_has_one_folder_per_point(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(dump_toml(tiny_experiment()))
    other = tmp_path / "other.toml"
    other.write_text(dump_toml(tiny_experiment(model={"latent_dim": 2})))
    sweep = Sweep([path, other], tmp_path / "out", seeds=[0, 1], grid=parse_grid(["train.lr=0.01,0.001", "model.hidden=[8],[8,4]"]))
    points = sweep.points()
    assert len(points) == 2 * 2 * 2 * 2 and len({point.folder for point in points}) == len(points)
    point = next(p for p in points if p.experiment == other and p.seed == 1 and p.settings == (("train.lr", "0.001"), ("model.hidden", "[8,4]")))
    assert point.folder == tmp_path / "out" / "other,train.lr=0.001,model.hidden=8+4" / "seed1"
    config = resolved(point)
    assert (config["seed"], config["train"]["lr"], config["model"]["hidden"], config["model"]["latent_dim"]) == (1, 0.001, [8, 4], 2)
    assert status(point, config) == "start"
    # A mistake in a grid value is named with its point before anything runs.
    bad = Sweep([path], tmp_path / "bad", grid=parse_grid(["model.latent_dim=two"]))
    with pytest.raises(ConfigError, match=r"sweep point model.latent_dim=two/seed0: \[model\] latent_dim"):
        resolved(bad.points()[0])


def _sweep_command(experiment: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pyrovae", "sweep", str(experiment), "--out", str(out), "--seeds", "0-1"]


def test_a_sweep_killed_and_run_again_skips_finished_points_and_resumes_the_others(tmp_path, capsys):
    experiment = tmp_path / "tiny.toml"
    # Long enough (about a second an epoch on a busy CPU) to be stopped in the middle of the second point.
    experiment.write_text(dump_toml(tiny_experiment(train={"epochs": 12, "batch_size": 32}, evaluate={"particles": 5})))
    out = tmp_path / "sweep"
    first, second = out / "base" / "seed0", out / "base" / "seed1"
    process = subprocess.Popen(_sweep_command(experiment, out), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not ((first / "final.json").exists() and (second / "checkpoints" / "latest.pt").exists()):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the sweep did not reach its second point"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130 and "run the same command again" in output, output
    assert not (second / "final.json").exists(), "the second point finished before it was stopped; make it longer"
    stopped_at = len((second / "metrics.jsonl").read_text().splitlines())
    finished_at = (first / "final.json").stat().st_mtime_ns

    rerun = subprocess.run(_sweep_command(experiment, out), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 of 2 points already finished (skipped)" in rerun.stderr and "1 resumed" in rerun.stderr
    assert (first / "final.json").stat().st_mtime_ns == finished_at
    sessions = json.loads((second / "sweep.json").read_text())["sessions"]
    assert [session["resumed"] for session in sessions] == [False, True] and sessions[-1]["exit_code"] == 0
    assert [line.endswith("--resume") for line in (second / "train.log").read_text().splitlines() if line.startswith("---")] == [False, True]
    epochs = [json.loads(line)["epoch"] for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13)) and stopped_at < 12  # resumed from its checkpoint: no epoch twice

    # The summary is the run folders' numbers: mean and sample std over the seeds.
    finals = [json.loads((folder / "final.json").read_text()) for folder in (first, second)]
    rows = {row["metric"]: row for row in csv.DictReader((out / "summary.csv").open())}
    for metric in ("test_elbo", "test_log_likelihood", "best_epoch"):
        values = [final[metric] for final in finals]
        assert float(rows[metric]["mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert float(rows[metric]["std"]) == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert [float(rows[metric]["seed0"]), float(rows[metric]["seed1"])] == pytest.approx(values, rel=1e-12)
    assert float(rows["train_seconds"]["seed1"]) == pytest.approx(
        sum(json.loads(line)["seconds"] for line in (second / "metrics.jsonl").read_text().splitlines()), abs=0.06
    )
    markdown = (out / "summary.md").read_text()
    assert "| base | 2/2 |" in markdown and "test_elbo" in markdown
    # A point stopped after it wrote final.json (before its plots) is resumed, not skipped as finished.
    record = json.loads((first / "sweep.json").read_text())
    record["sessions"][-1]["exit_code"] = 130
    (first / "sweep.json").write_text(json.dumps(record))
    point = next(p for p in Sweep([experiment], out, seeds=[0, 1]).points() if p.folder == first)
    assert status(point, resolved(point)) == "resume"
    record["sessions"][-1]["exit_code"] = 0
    (first / "sweep.json").write_text(json.dumps(record))
    assert (out / "base" / "summary.csv").read_text() == (out / "summary.csv").read_text()  # the one grid point's own
    # Regenerated from the folders, also on its own.
    (out / "summary.md").unlink()
    assert main(["sweep", str(experiment), "--out", str(out), "--seeds", "0-1", "--summary-only"]) == 0
    assert (out / "summary.md").read_text().split("\n", 4)[4] == markdown.split("\n", 4)[4]  # all but the date line

    # Each point is an ordinary run folder.
    capsys.readouterr()
    assert main(["evaluate", str(second)]) == 0
    assert json.loads(capsys.readouterr().out)["test_elbo"] == pytest.approx(finals[1]["test_elbo"], rel=1e-9)
    groups = summarize(Sweep([experiment], out, seeds=[0, 1]))
    assert [group.missing for group in groups] == [[]]

    # The same folders swept with another --set: refused before anything runs, and a summary for
    # that --set credits none of the old runs to it.
    before = markdown
    capsys.readouterr()
    other = ["sweep", str(experiment), "--out", str(out), "--seeds", "0-1", "--set", "model.latent_dim=3"]
    assert main(other) == 2
    error = capsys.readouterr().err
    assert "sweep point base/seed0:" in error and "holds a run of another experiment (it differs in model.latent_dim)" in error
    assert "sweep into a new --out" in error
    assert (out / "summary.md").read_text() == before and (first / "final.json").stat().st_mtime_ns == finished_at
    assert main([*other, "--summary-only"]) == 0
    assert "| base | 0/2 |" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert main(["sweep", str(experiment), "--out", str(out), "--seeds", "0-1", "--set", "train.epochs=5"]) == 2
    assert "has trained 12 epochs, more than train.epochs = 5; a sweep may raise train.epochs, not lower it" in capsys.readouterr().err
