"""Data-parallel training under torchrun: 2 CPU processes (gloo) on the digits data.

Every process is started with ``python -m torch.distributed.run --standalone``: torchrun's
standalone rendezvous binds port 0, so the OS picks a free port for each job (it ignores an
explicit ``--rdzv-endpoint``; two test runs at once cannot collide). Each launch runs in its own
session with a bounded timeout, and whatever is left of it is killed by process group.

To keep the file fast, one launch (``worker``) runs several scenarios in the same job, one after
another; each rank writes what it saw to a JSON file, and the tests read those.

Why the parameter comparison is meaningful. With the same global batch (``train.batch_size``,
shared out across the ranks) and seed, a 2-rank step averages the ranks' gradients, weighted by
their rows, which is the 1-rank gradient of the same global batch, provided the batch holds the
same rows and nothing random differs. Rank 0 draws each epoch's permutation exactly as a single
process does and sends it to the other ranks, so the rows agree. Sampling noise cannot agree (a
rank draws z for its own rows only), so the comparison uses static binarization and
:class:`MeanELBO`, the ELBO with every guide site at its mean: the whole run is deterministic,
and the two runs differ only by float rounding in the reductions. Tolerance: 1e-4 absolute on
every parameter after 2 epochs (42 Adam steps of 63 images, 32 on one rank and 31 on the other;
the observed difference is about 3e-7).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch
from pyro.poutine.messenger import Messenger

from pyrovae.experiment import Experiment
from pyrovae.objectives import ELBO

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.toml"
TOLERANCE = 1e-4
# Batches of 63 rows split 32/31, so the ranks' gradients and metrics are weighted unequally at every step.
DETERMINISTIC_SETTINGS = ['data.binarize="static"', 'objective.name="tests.test_distributed:MeanELBO"', "train.batch_size=63"]
DETERMINISTIC = [item for setting in DETERMINISTIC_SETTINGS for item in ("--set", setting)]


class _AtTheMean(Messenger):
    """Every unobserved site the guide samples takes its distribution's mean (no random draw)."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and msg["value"] is None and getattr(msg["fn"], "has_rsample", False):
            msg["value"] = msg["fn"].mean


class MeanELBO(ELBO):
    """The ELBO evaluated at z = the guide's mean: deterministic, differentiable in both parts."""

    def __call__(self, model, guide, batch):
        with _AtTheMean():
            return super().__call__(model, guide, batch)


class RankFlakyELBO(ELBO):
    """An ELBO whose training loss turns NaN at one training call on one rank only."""

    def __init__(self, rank: int, bad_call: int):
        super().__init__()
        self.rank, self.bad_call, self.calls = rank, bad_call, 0

    def __call__(self, model, guide, batch):
        loss, metrics = super().__call__(model, guide, batch)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.bad_call and int(os.environ.get("RANK", "0")) == self.rank:
                loss = loss * float("nan")
                metrics = dict(metrics, reconstruction=metrics["reconstruction"] * float("nan"))
        return loss, metrics


# --- launching -------------------------------------------------------------------------------------


def torchrun_command(*arguments: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *arguments]


def environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYROVAE_DIST_TIMEOUT="120")
    env.pop("WORLD_SIZE", None)
    return env


def kill_group(process: subprocess.Popen) -> None:
    """End a launch and everything it started (its own session), if anything is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def run_launch(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    process = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise AssertionError(f"{' '.join(command)} did not finish in {timeout} s")
    finally:
        if process.poll() is None:
            kill_group(process)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def parameters(path: Path) -> dict[str, torch.Tensor]:
    from pyrovae.train import load_checkpoint

    saved = load_checkpoint(path)
    return {f"{part}.{name}": tensor for part in ("model", "guide") for name, tensor in saved[part].items()}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the worker: scenarios run by every rank of one job -------------------------------------------


def tiny(**overrides) -> dict:
    from tests.conftest import tiny_experiment

    return tiny_experiment(**overrides)


def _digest(experiment) -> list[float]:
    return [float(p.detach().double().sum()) for p in list(experiment.model.parameters()) + list(experiment.guide.parameters())]


def worker(out: Path) -> None:
    from pyrovae.cli import main
    from pyrovae.train import distributed, fit

    context = distributed.setup("cpu")
    rank = context.rank

    def report(name: str, value: dict) -> None:
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(value))

    # Families that need more than the plain ELBO: M2 with its labels enumerated, and IWAE.
    families = {
        "m2_enum_elbo": tiny(
            data={"name": "digits", "labels_per_class": 20},
            model={"name": "tests.families:M2"},
            guide={"name": "tests.families:M2Guide"},
            objective={"name": "enum_elbo"},
            train={"epochs": 2, "batch_size": 128, "lr": 3e-3},
            evaluate={"particles": 5, "test_examples": 100},
        ),
        "iwae": tiny(objective={"name": "iwae", "particles": 3}, train={"epochs": 2}, evaluate={"particles": 5, "test_examples": 100}),
        # Streamed from memory-mapped arrays, written once by one of the ranks.
        "memmap": tiny(data={"name": "digits", "memmap": str(out / "arrays")}, train={"epochs": 2}, evaluate={"particles": 5}),
    }
    for name, config in families.items():
        experiment = Experiment.from_config(config)
        final = experiment.train(out / name, progress=False)
        report(name, {"final": final, "digest": _digest(experiment), "data": type(experiment.data).__name__})

    # The distributed step reads nothing back from the device (sharding, objective, averaging, clipping).
    from tests.test_enum_elbo import no_host_reads
    from pyrovae.objectives import IWAE

    for objective in (ELBO(), IWAE(particles=3)):
        experiment = Experiment.from_config(tiny())
        parameters = list(experiment.model.parameters()) + list(experiment.guide.parameters())
        averager = distributed.GradientAverager(context, parameters)
        order = torch.arange(experiment.data.size("train"))
        objective(experiment.model, experiment.guide, next(experiment.data.batches("train", 8)))  # inspection, validation
        pyro.enable_validation(False)  # as the fit loop does after the first step
        torch.distributions.Distribution.set_default_validate_args(False)
        with no_host_reads():
            for step, (batch, rows, total) in enumerate(experiment.data.shard_batches("train", 64, order, rank, 2)):
                loss, _ = objective(experiment.model, experiment.guide, batch)
                loss.backward()
                averager(rows * 2 / total)
                torch.nn.utils.clip_grad_norm_(parameters, 100.0)
                if step == 2:
                    break
    report("no_host_reads", {})

    # One rank's NaN rolls every rank back.
    experiment = Experiment.from_config(tiny(train={"epochs": 2}))
    result = fit(experiment.model, experiment.guide, RankFlakyELBO(1, 5), experiment.data, experiment.train_config, progress=False)
    report("nonfinite", {"retries": result.state.nonfinite_retries, "lrs": [r["lr"] for r in result.state.history], "digest": _digest(experiment)})

    # Resume at the same world size is exact.
    unbroken = Experiment.from_config(tiny(train={"epochs": 3}))
    unbroken.train(out / "unbroken", progress=False)
    Experiment.from_config(tiny(train={"epochs": 2})).train(out / "resumed", progress=False)
    Experiment.from_config(tiny(train={"epochs": 3})).train(out / "resumed", resume=True, progress=False)
    report("resume", {})

    # Last (the command line leaves the process group at its end): the quickstart, deterministic.
    code = main(["train", str(QUICKSTART), "--out", str(out / "quickstart"), "--no-progress", "--set", "train.epochs=2",
                 "--set", "evaluate.particles=5", *DETERMINISTIC])
    report("cli", {"code": code})


@pytest.fixture(scope="module")
def worker_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    done = run_launch(torchrun_command("-m", "tests.test_distributed", "worker", str(out)), timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


def read_ranks(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}.rank{rank}.json").read_text()) for rank in range(2)]


# --- tests ---------------------------------------------------------------------------------------


def test_two_processes_reach_the_parameters_of_one_with_the_same_global_batch(worker_job, tmp_path):
    from pyrovae.config import load_experiment

    out, _ = worker_job
    assert read_ranks(out, "cli")[0]["code"] == 0
    two = out / "quickstart"
    single = Experiment.from_config(
        load_experiment(QUICKSTART, ["train.epochs=2", "evaluate.particles=5", *DETERMINISTIC_SETTINGS])
    )
    from pyrovae.train import fit

    # The fit loop alone (test metrics and plots are not compared).
    fit(single.model, single.guide, single.objective, single.data, single.train_config, anneal=single.anneal, run_dir=tmp_path / "one", progress=False)
    one_parameters, two_parameters = parameters(tmp_path / "one" / "checkpoints" / "latest.pt"), parameters(two / "checkpoints" / "latest.pt")
    assert one_parameters.keys() == two_parameters.keys()
    worst = max(float((one_parameters[k] - two_parameters[k]).abs().max()) for k in one_parameters)
    assert worst < TOLERANCE, f"largest parameter difference {worst:.3g}"
    # The same steps, and metrics reduced over both ranks that equal the single process's.
    one_records, two_records = records(tmp_path / "one"), records(two)
    assert [r["step"] for r in one_records] == [r["step"] for r in two_records] == [21, 42]
    for a, b in zip(one_records, two_records):
        for key in ("train/elbo", "train/loss", "valid/elbo", "valid/kl/z"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    final = json.loads((two / "final.json").read_text())
    assert final["world_size"] == 2 and final["test_examples"] == 359
    # Only rank 0 wrote the run folder: one config, one lock, no stray temporaries.
    assert not list(two.rglob("*.tmp"))


def test_m2_enumerated_and_iwae_objectives_run_under_two_processes(worker_job):
    out, _ = worker_job
    for name in ("m2_enum_elbo", "iwae"):
        ranks = read_ranks(out, name)
        assert ranks[0]["digest"] == ranks[1]["digest"], f"{name}: the ranks' parameters differ"
        final = ranks[0]["final"]
        assert final["world_size"] == 2 and all(math.isfinite(v) for v in final.values() if isinstance(v, float))
        timing = {"train_seconds_this_session"}  # each rank's own clock
        assert {k: v for k, v in final.items() if k not in timing} == {
            k: v for k, v in ranks[1]["final"].items() if k not in timing
        }, f"{name}: the ranks reduced different test numbers"
        history = records(out / name)
        assert [r["epoch"] for r in history] == [1, 2]
    assert 0.0 <= read_ranks(out, "m2_enum_elbo")[0]["final"]["test_kl/y_unobserved"] <= math.log(10) + 1e-4
    assert "test_iwae" in read_ranks(out, "iwae")[0]["final"]


def test_memory_mapped_data_under_two_processes(worker_job):
    out, _ = worker_job
    ranks = read_ranks(out, "memmap")
    assert [r["data"] for r in ranks] == ["MemmapSplits", "MemmapSplits"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert (out / "arrays" / "pyrovae-arrays.json").exists() and not list(out.glob(".arrays.*"))


def test_the_distributed_step_reads_nothing_back_from_the_device(worker_job):
    out, _ = worker_job
    assert len(read_ranks(out, "no_host_reads")) == 2  # the worker would have stopped at a host read


def test_one_ranks_nan_rolls_back_every_rank(worker_job):
    out, _ = worker_job
    ranks = read_ranks(out, "nonfinite")
    assert [r["retries"] for r in ranks] == [1, 1]
    assert ranks[0]["lrs"] == ranks[1]["lrs"] == [3e-3 / 2, 3e-3 / 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_resume_at_the_same_world_size_is_exact(worker_job):
    out, _ = worker_job
    unbroken, resumed = parameters(out / "unbroken" / "checkpoints" / "latest.pt"), parameters(out / "resumed" / "checkpoints" / "latest.pt")
    for name, tensor in unbroken.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after a 2-process resume"
    assert [r["valid/elbo"] for r in records(out / "unbroken")] == [r["valid/elbo"] for r in records(out / "resumed")]


def _descendants(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _rank_of(pid: int) -> int | None:
    try:
        variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in variables:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_sigkill_of_one_rank_stops_the_job_with_a_message_and_resume_continues(tmp_path, capsys):
    run = tmp_path / "run"
    arguments = ["-m", "pyrovae", "train", str(QUICKSTART), "--out", str(run), "--no-progress", "--set", "evaluate.particles=10"]
    process = subprocess.Popen(
        torchrun_command(*arguments, "--set", "train.epochs=400"),
        cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.1)
        victims = [pid for pid in _descendants(process.pid) if _rank_of(pid) == 1]
        assert victims, "rank 1 not found"
        os.kill(victims[0], signal.SIGKILL)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            kill_group(process)
        else:
            kill_group(process)  # anything it left behind
    assert process.returncode != 0
    # Rank 0 says in one line what happened, and how to continue.
    said = [line for line in err.splitlines() if line.startswith("pyrovae train: error:")]
    assert said, err[-3000:]
    assert any("lost contact with the other processes" in line or "stopped by signal SIGTERM" in line for line in said), said
    assert any("--resume" in line for line in said), said

    from pyrovae.train import load_checkpoint

    killed_at = load_checkpoint(run / "checkpoints" / "latest.pt")["state"]["epoch"]
    assert 3 <= killed_at < 400
    # The shortcut launches torchrun itself; the resume continues from the last finished epoch.
    done = run_launch([sys.executable, *arguments, "--set", f"train.epochs={killed_at + 2}", "--resume", "--nproc", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["epoch"] for r in records(run)] == list(range(1, killed_at + 3))
    assert json.loads(done.stdout)["world_size"] == 2

    # Resuming at another world size (here 1) is allowed, and says what changes.
    from pyrovae.cli import main

    assert main(["train", str(QUICKSTART), "--out", str(run), "--no-progress", "--set", "evaluate.particles=10",
                 "--set", f"train.epochs={killed_at + 3}", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming a run written by 2 process(es) with 1" in err
    assert [r["epoch"] for r in records(run)] == list(range(1, killed_at + 4))


def test_bf16_is_ignored_on_the_cpu_with_a_message(capsys):
    from pyrovae.train import fit

    experiment = Experiment.from_config(tiny(train={"epochs": 1, "precision": "bf16"}))
    result = fit(experiment.model, experiment.guide, experiment.objective, experiment.data, experiment.train_config, progress=False)
    assert "train.precision = 'bf16' applies to CUDA only; this run trains on cpu in float32" in capsys.readouterr().err
    assert result.state.epoch == 1 and all(p.dtype == torch.float32 for p in experiment.model.parameters())
    from pyrovae.train import TrainConfig

    with pytest.raises(ValueError, match="train.precision = 'fp16' is not allowed: it must be one of fp32, bf16"):
        TrainConfig(precision="fp16")


def test_nproc_under_torchrun_is_refused_in_one_line(capsys, monkeypatch):
    from pyrovae.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", str(QUICKSTART), "--nproc", "2"]) == 2
    assert "error: --nproc starts torchrun, but this process already runs under torchrun" in capsys.readouterr().err


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(Path(sys.argv[2]))
