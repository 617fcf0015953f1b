"""The synthetic posterior-collapse picture of He et al. 2019, section 3.

Sentences come from an LSTM with a scalar latent (data set ``synthetic_lstm``,
:mod:`pyrovae.data.synthetic_sequences`). A sentence VAE with ``latent_dim = 1`` is trained on them,
plainly or with aggressive guide updates, by the fit loop in a run folder, stopped and resumed at
chosen epochs. At each stop, for held-out sentences x, the script compares

    mu_x,phi   = E_q[z | x]                    (the guide's mean)
    mu_x,theta = E_{p_theta(z | x)}[z]          (the model's posterior mean, on a grid: pyrovae.analysis.quadrature)

and draws one scatter panel per stop (x-axis mu_x,phi, y-axis mu_x,theta, the diagonal). A guide
that keeps up with the model puts the points on the diagonal; a lagging guide puts them on the
vertical line mu_x,phi = 0, a model that ignores z on the horizontal one, and collapse at the origin.

    OMP_NUM_THREADS=1 python experiments/synthetic_collapse.py experiments/synthetic_collapse_basic.toml \\
        --out runs/synthetic_collapse_basic --epochs 0 1 2 5 10 20 \\
        --figure experiments/figures/synthetic_posterior_mean_basic.png

Each stop is ``Experiment.train`` with ``train.epochs`` raised and ``--resume`` (as ``pyrovae train
--resume --set train.epochs=N`` would), so the run folder is an ordinary run; its final.json holds
the last stop's test metrics (evaluate.particles importance samples; the earlier stops use
--snapshot-particles). The panels' numbers go to OUT/posterior_means.json, with the true model's
posterior summary (its I(x; z), posterior width and NLL on the same sentences); ``--redraw``
draws the figure again from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from pyrovae.analysis import grid_posterior, posterior_means
from pyrovae.config import load_experiment
from pyrovae.data.synthetic_sequences import generator_of
from pyrovae.experiment import Experiment


def posterior_mean_snapshot(experiment: Experiment, rows: int, grid: torch.Tensor) -> dict:
    """The guide's means E_q[z | x] and the model's grid posterior means E_p(z | x)[z] of the first
    ``rows`` test sentences, with the experiment's parameters as they are now."""
    test = experiment.data.rows("test", 0, min(rows, experiment.data.size("test")))
    inputs = experiment.inputs()
    guide_mean = posterior_means(experiment.model, experiment.guide, test, samples=1, inputs=inputs)["z"][:, 0]
    model = grid_posterior(experiment.model, {**test, **inputs}, grid)
    if model.edge_weight > 1e-6:
        print(f"warning: the grid [{float(grid[0])}, {float(grid[-1])}] misses posterior mass (weight {model.edge_weight:.2g} at an end point)", file=sys.stderr)
    return {
        "step": experiment.step,
        "guide_mean": guide_mean.tolist(),
        "model_mean": model.mean.tolist(),
        "model_std": model.std.tolist(),
        "model_kl_from_prior": float(model.kl_from_prior.mean()),
        "grid_edge_weight": model.edge_weight,
    }


def true_posterior_summary(experiment: Experiment, rows: int, grid: torch.Tensor) -> dict:
    """The generator's own posterior on the same test sentences: how much x tells about z."""
    test = experiment.data.rows("test", 0, min(rows, experiment.data.size("test")))
    generator = generator_of(experiment.config["data"]).to(test["x"].device)
    truth = grid_posterior(generator.model, test, grid)
    return {
        "posterior_std_mean": float(truth.std.mean()),
        "posterior_std_median": float(truth.std.median()),
        "mutual_information": float(truth.kl_from_prior.mean()),
        "nll": float(-truth.log_marginal.mean()),
        "corr_mean_true_z": float(torch.corrcoef(torch.stack([truth.mean, test["true_z"].cpu()]))[0, 1]),
        "grid_edge_weight": truth.edge_weight,
    }


def posterior_mean_figure(snapshots: list[dict], path: Path, title: str, limit: float | None = None) -> Path:
    """One scatter panel per snapshot: x = guide mean mu_x,phi, y = model posterior mean mu_x,theta,
    the diagonal dashed; the same axes [-limit, limit] in every panel (default: the largest mean),
    so collapse onto a line through 0 shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if limit is None:
        limit = max(1.0, 1.05 * max(abs(v) for snap in snapshots for key in ("guide_mean", "model_mean") for v in snap[key]))
    columns = min(len(snapshots), 4)
    rows = math.ceil(len(snapshots) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat[len(snapshots) :]:
        axis.set_visible(False)
    for axis, snap in zip(axes.flat, snapshots):
        axis.axhline(0, color="0.8", lw=0.8)
        axis.axvline(0, color="0.8", lw=0.8)
        axis.plot([-limit, limit], [-limit, limit], "k--", lw=0.8)
        axis.scatter(snap["guide_mean"], snap["model_mean"], s=5, alpha=0.5, color="tab:blue", linewidths=0)
        axis.set_xlim(-limit, limit)
        axis.set_ylim(-limit, limit)
        axis.set_aspect("equal")
        axis.set_title(f"epoch {snap['epoch']} (iteration {snap['step']})", fontsize=9)
        metrics = snap.get("metrics", {})
        note = f"KL {metrics['test_kl/z']:.3f}\nMI {metrics['test_mutual_information']:.3f}" if "test_kl/z" in metrics else ""
        axis.text(0.03, 0.97, note, transform=axis.transAxes, va="top", fontsize=8)
        axis.set_xlabel(r"guide mean $\mu_{x,\phi}$", fontsize=8)
        axis.set_ylabel(r"model posterior mean $\mu_{x,\theta}$", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


SNAPSHOT_FILE = "posterior_means.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path, help="the experiment TOML (synthetic_collapse_basic.toml or _aggressive.toml)")
    parser.add_argument("--out", type=Path, required=True, help="a new run folder")
    parser.add_argument("--epochs", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="stop after these many epochs (0: at initialisation)")
    parser.add_argument("--figure", type=Path, help="the PNG to write (default OUT/posterior_means.png)")
    parser.add_argument("--points", type=int, default=500, help="test sentences per panel")
    parser.add_argument("--grid", type=float, nargs=3, default=[-10.0, 10.0, 201], metavar=("LOW", "HIGH", "COUNT"))
    parser.add_argument("--limit", type=float, help="both axes span [-LIMIT, LIMIT] (default: the largest mean)")
    parser.add_argument("--snapshot-particles", type=int, default=10, help="importance samples of the test NLL at intermediate stops")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--redraw", action="store_true", help="only redraw the figure from OUT/posterior_means.json")
    args = parser.parse_args(argv)
    figure = args.figure or args.out / "posterior_means.png"
    title = f"{args.experiment.stem}: guide mean vs model posterior mean, {args.points} test sentences"
    if args.redraw:
        record = json.loads((args.out / SNAPSHOT_FILE).read_text())
        print(posterior_mean_figure(record["snapshots"], figure, title, args.limit))
        return 0
    epochs = sorted(set(args.epochs))
    if epochs[0] < 0:
        parser.error("--epochs must be >= 0")
    low, high, count = args.grid
    grid = torch.linspace(low, high, int(count))
    record = {"experiment": str(args.experiment), "grid": [low, high, int(count)], "snapshots": []}
    started, cpu_started = time.perf_counter(), time.process_time()
    train_seconds = 0.0
    for index, epoch in enumerate(epochs):
        last = index == len(epochs) - 1
        overrides = list(args.overrides) + [f"train.epochs={max(epoch, 1)}"]
        if not last:
            overrides.append(f"evaluate.particles={args.snapshot_particles}")
        experiment = Experiment.from_config(load_experiment(args.experiment, overrides))
        if index == 0:
            record["truth"] = true_posterior_summary(experiment, args.points, grid)
            print("true model:", json.dumps(record["truth"]), flush=True)
        if epoch == 0:
            metrics = experiment.test_metrics(particles=args.snapshot_particles)
        else:
            metrics = experiment.train(args.out, resume=any(s["epoch"] > 0 for s in record["snapshots"]), progress=False)
            train_seconds += metrics["train_seconds_this_session"]
        snapshot = {"epoch": epoch, **posterior_mean_snapshot(experiment, args.points, grid)}
        snapshot["metrics"] = {key: value for key, value in metrics.items() if isinstance(value, (int, float, bool))}
        record["snapshots"].append(snapshot)
        shown = {key: round(metrics[key], 4) for key in ("test_elbo", "test_nll", "test_kl/z", "test_mutual_information") if key in metrics}
        print(f"epoch {epoch} (step {snapshot['step']}): {json.dumps(shown)}", flush=True)
        record.update(train_seconds=round(train_seconds, 1), wall_seconds=round(time.perf_counter() - started, 1), cpu_seconds=round(time.process_time() - cpu_started, 1))
        # The run folder takes other files only once pyrovae has made it a run folder.
        if epoch > 0 or last:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / SNAPSHOT_FILE).write_text(json.dumps(record) + "\n")
            posterior_mean_figure(record["snapshots"], figure, title, args.limit)
    print(f"wrote {figure} and {args.out / SNAPSHOT_FILE}; train {train_seconds:.0f} s, wall {record['wall_seconds']:.0f} s, CPU {record['cpu_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
