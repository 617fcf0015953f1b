"""Smoke tests of the benchmark scripts: they run at a tiny size and print their result lines.
Nothing timed is asserted; what is checked is that the two sides of a comparison compute the same thing."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_sentence_step_tiny_run_prints_its_ratio_lines():
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "sentence_step.py"), "--tiny"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    values = {}
    for key in ("aggressive_epoch_ratio", "aggressive_epoch_ratio_without_mi", "guide_steps_per_model_step", "step_ratio"):
        matches = [re.fullmatch(rf"{key}=(\d+\.\d+)", line) for line in lines]
        found = [m for m in matches if m]
        assert len(found) == 1, f"no single line {key}=... in:\n{run.stdout}"
        values[key] = float(found[0].group(1))
    assert lines[-1].startswith("step_ratio=")
    # --tiny caps the inner loop at 6 steps; each model step takes at least the first one.
    assert 1.0 <= values["guide_steps_per_model_step"] <= 6.0
    losses = re.search(r"loss on the first batch \(same noise\): pyrovae (\S+)  plain (\S+)", run.stdout)
    assert losses is not None, run.stdout
    assert float(losses.group(1)) == pytest.approx(float(losses.group(2)), rel=1e-5)


@pytest.fixture(scope="module")
def sentence_step():
    return load_benchmark("sentence_step")


@pytest.fixture(autouse=True)
def one_thread():
    # On a shared 2-core machine, two intra-op threads make a tiny step seconds long instead of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_setup(sentence_step):
    data = sentence_step.random_word_data(vocabulary=30, sizes=sentence_step.TINY, sentences=16)
    model, guide = sentence_step.pyrovae_pair(data, sentence_step.TINY, seed=0)
    plain = sentence_step.PlainSentenceVAE(model, guide)
    batch = next(data.batches("train", 8))
    return model, guide, plain, batch


def test_hand_written_step_is_the_same_loss_and_gradient(sentence_step):
    model, guide, plain, batch = tiny_setup(sentence_step)
    ours, theirs, gradient_gap = sentence_step.check_same_step(model, guide, plain, sentence_step.MeanFieldELBO(), batch)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert gradient_gap < 1e-5
    assert all(p.grad is None for part in (model, guide, plain) for p in part.parameters())


@pytest.mark.parametrize("layer", ["output", "initial_state", "head"])
def test_check_stops_on_a_different_computation(sentence_step, layer):
    model, guide, plain, batch = tiny_setup(sentence_step)
    with torch.no_grad():
        # One entry only: a shift of all output biases would leave the softmax, and the loss, unchanged.
        getattr(plain, layer).bias[-1] += 0.1
    with pytest.raises(SystemExit, match="the two steps disagree on the first batch"):
        sentence_step.check_same_step(model, guide, plain, sentence_step.MeanFieldELBO(), batch)


def test_peers_smoke_run_reports_every_implementation_with_the_traced_step(tmp_path):
    """One repeat on 512 random images: every ratio is printed, including pyrovae's traced step."""
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "peers.py"), "--repeats", "1", "--train-examples", "512", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ratios = dict(re.findall(r"(\S+)=([0-9.]+)", run.stdout.splitlines()[-1]))
    for key in ("elbo/pyrovae", "elbo/pyrovae_trace", "elbo/pyro_svi", "iwae_k5/pyrovae", "iwae_k5/pyrovae_trace"):
        assert float(ratios[key]) > 0, run.stdout
    assert "running the step eagerly" not in run.stdout + run.stderr  # the traced step held


def test_step_overhead_tiny_run_prints_the_traced_ratio():
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_overhead.py"), "--tiny", "--steps", "20"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"elbo: .*trace ratio [0-9.]+", run.stdout) and re.search(r"iwae_k5: .*trace ratio [0-9.]+", run.stdout), run.stdout


def test_auto_guide_step_tiny_run_prints_both_pairs_and_its_ratio():
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "auto_guide_step.py"), "--steps", "3"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("vae: auto/written eager") for line in lines)
    assert any(line.startswith("ladder: auto/written eager") for line in lines)
    # Both compiled steps captured their pair (a refusal prints a line saying it runs eagerly).
    assert not any("running the step eagerly" in line for line in lines), run.stdout
    assert re.fullmatch(r"ratio=\d+\.\d+", lines[-1])
