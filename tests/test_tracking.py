"""[log] tensorboard and [log] mlflow, read back with the libraries' own readers (TensorBoard's
EventAccumulator, mlflow.search_runs and MlflowClient); one line per epoch without a progress bar."""

from __future__ import annotations

import json
import re
import sys

import pytest
from conftest import tiny_experiment

from pyrovae.cli import main
from pyrovae.config import dump_toml
from pyrovae.train.tracking import Tracker, Trackers, log_analysis, mlflow_link


def _train(tmp_path, capsys, experiment: dict, run: str = "run", *extra: str) -> tuple:
    path = tmp_path / f"{run}.toml"
    path.write_text(dump_toml(experiment))
    code = main(["train", str(path), "--out", str(tmp_path / run), "--no-progress", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    return tmp_path / run, records, captured.err


def _experiment(epochs: int = 2, **log) -> dict:
    return tiny_experiment(
        anneal={"name": "linear", "warmup_steps": 20},
        train={"epochs": epochs, "log_every": 3},
        evaluate={"particles": 5},
        log=log,
    )


def test_tensorboard_holds_the_records_the_step_losses_the_schedules_and_a_picture(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records, _ = _train(tmp_path, capsys, _experiment(tensorboard=True))

    def events():
        accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        return accumulator

    accumulator = events()
    for key in ("valid/elbo", "train/loss", "beta", "lr"):
        assert [(event.step, event.value) for event in accumulator.Scalars(key)] == [
            (record["step"], pytest.approx(record[key], rel=1e-6)) for record in records
        ], key
    losses = accumulator.Scalars("step/loss")
    assert [event.step for event in losses] == list(range(3, records[-1]["step"] + 1, 3))
    assert all(event.value > 0 for event in losses)
    # beta at each logged step: the linear schedule, min(1, step / 20)
    assert [event.value for event in accumulator.Scalars("step/beta")] == pytest.approx([min(1.0, e.step / 20) for e in losses])
    pictures = accumulator.Images("samples")
    assert [picture.step for picture in pictures] == [record["step"] for record in records]
    assert (pictures[0].height, pictures[0].width) == (3 * 9 - 1, 8 * 9 - 1)  # 3 rows of 8 digits, 8x8, 1 px apart
    assert accumulator.Scalars("test/elbo")[0].value == pytest.approx(json.loads((run / "final.json").read_text())["test_elbo"])

    # Tracking draws its picture without moving the run's random numbers: the same run untracked.
    _, untracked, _ = _train(tmp_path, capsys, _experiment(), "untracked")
    assert [record["valid/elbo"] for record in untracked] == [record["valid/elbo"] for record in records]

    # A resumed run goes on in the same files, with no step twice.
    _, resumed, _ = _train(tmp_path, capsys, _experiment(tensorboard=True), "run", "--resume", "--set", "train.epochs=3")
    steps = [event.step for event in events().Scalars("valid/elbo")]
    assert steps == [record["step"] for record in resumed] and len(steps) == 3


def test_mlflow_holds_the_config_the_records_and_the_artifacts_and_a_resume_continues_the_run(tmp_path, capsys, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the default store: mlruns/ in the working directory
    run, records, _ = _train(tmp_path, capsys, _experiment(mlflow=True, mlflow_experiment="tiny"))
    link = mlflow_link(run)
    assert (tmp_path / "mlruns" / "mlflow.db").exists() and link["tracking_uri"].startswith("sqlite:///")
    mlflow.set_tracking_uri(link["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 1 and runs["run_id"][0] == link["run_id"] and runs["status"][0] == "FINISHED"
    assert runs["params.train.lr"][0] == "0.003" and runs["params.model.hidden"][0] == "[32]"
    final = json.loads((run / "final.json").read_text())
    assert runs["metrics.test_elbo"][0] == pytest.approx(final["test_elbo"])
    client = MlflowClient(link["tracking_uri"])
    history = client.get_metric_history(link["run_id"], "valid/elbo")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["valid/elbo"])) for r in records]
    artifacts = {artifact.path for artifact in client.list_artifacts(link["run_id"])}
    assert {"final.json", "config.toml", "curves.png", "samples.png"} <= artifacts

    _, resumed, _ = _train(tmp_path, capsys, _experiment(mlflow=True, mlflow_experiment="tiny"), "run", "--resume", "--set", "train.epochs=3")
    assert mlflow_link(run)["run_id"] == link["run_id"]
    assert len(mlflow.search_runs(experiment_names=["tiny"])) == 1
    history = client.get_metric_history(link["run_id"], "valid/elbo")
    assert sorted(m.step for m in history) == [r["step"] for r in resumed]
    assert client.get_run(link["run_id"]).info.status == "FINISHED"

    # pyrovae analyze's folder joins the same run.
    (run / "analysis").mkdir()
    (run / "analysis" / "report.md").write_text("# report\n")
    assert log_analysis(run, run / "analysis")
    assert [a.path for a in client.list_artifacts(link["run_id"], "analysis")] == ["analysis/report.md"]


@pytest.mark.parametrize("setting, module, extra", [("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")])
def test_a_missing_tracker_is_named_in_one_line_before_training(tmp_path, capsys, monkeypatch, setting, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    path = tmp_path / "experiment.toml"
    path.write_text(dump_toml(_experiment(**{setting: True})))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f'pip install -e ".[{extra}]"' in error[0], error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_without_a_bar_each_epoch_is_one_line(tmp_path, capsys):
    _, records, err = _train(tmp_path, capsys, _experiment(epochs=3))
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    pattern = r"epoch (\d)/3  valid elbo (-?[\d.]+)  ([\d.]+) s(  about \d+ s left)?"
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches) and len(matches) == 3, lines
    assert [int(m.group(1)) for m in matches] == [1, 2, 3]
    assert [float(m.group(2)) for m in matches] == pytest.approx([r["valid/elbo"] for r in records], abs=5e-3 * 40)
    assert [bool(m.group(4)) for m in matches] == [True, True, False]  # time left, but not after the last epoch
    assert "\r" not in err


def test_only_rank_0_tracks():
    class Counting(Tracker):
        calls = 0

        def epoch(self, training, record):
            Counting.calls += 1

    Trackers([Counting()], active=False).epoch(None, {"step": 1})
    Trackers([Counting()], active=True).epoch(None, {"step": 1})
    assert Counting.calls == 1
