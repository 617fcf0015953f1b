"""Popularity and EASE on the MovieLens split of movielens_multvae.toml, beside the trained Mult-DAE and
Mult-VAE runs: NDCG@100, Recall@20 and Recall@50 on the test users, printed as a Markdown table.

    python experiments/movielens_baselines.py [--vae RUN_DIR] [--dae RUN_DIR]

The data are built from the experiment file's own [data] table, so the split is the one the VAEs
were trained and evaluated on. EASE's lambda is chosen by validation NDCG@100 over --l2 (a grid).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pyrovae.analysis.ranking import evaluate_ranking, ranking_metrics
from pyrovae.baselines import Popularity, tune_ease
from pyrovae.config import load_experiment
from pyrovae.data.movielens import movielens

HERE = Path(__file__).resolve().parent
METRICS = ("ndcg@100", "recall@20", "recall@50")
# Liang et al. 2018, Table 2 (ML-20M), as context only: another, much larger data set.
PAPER_ML20M = {"Mult-VAE (paper, ML-20M; context only)": (0.426, 0.395, 0.537)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=str(HERE / "movielens_multvae.toml"), help="TOML whose [data] table gives the split")
    parser.add_argument("--vae", help="run folder of movielens_multvae.toml (its final.json)")
    parser.add_argument("--dae", help="run folder of movielens_multdae.toml (its final.json)")
    parser.add_argument("--l2", default="1,5,10,20,50,100,200,300,500,1000,2000", help="EASE lambdas, comma-separated")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--data-seed", type=int, help="another split (data.seed), as --set data.seed=N gives pyrovae train")
    args = parser.parse_args(argv)

    table = dict(load_experiment(args.experiment)["data"])
    if table.pop("name") != "movielens":
        parser.error(f"{args.experiment} does not use the movielens data")
    if args.data_seed is not None:
        table["seed"] = args.data_seed
    data = movielens(**table)
    print(f"data: {data.size('train')} training users, {data.size('valid')} validation and {data.size('test')} test users, {data.spec.x_shape[0]} items")

    rows = {}
    started = time.perf_counter()
    popularity = Popularity(data.csr("train", "x"))
    rows["Popularity"] = evaluate_ranking(popularity.scores, data, "test", args.batch_size)
    grid = [float(value) for value in args.l2.split(",")]
    ease, records = tune_ease(data, grid, args.batch_size)
    print("EASE lambda on validation: " + ", ".join(f"{r['l2']:g}: NDCG@100 {r['ndcg@100']:.4f}" for r in records))
    rows[f"EASE (lambda = {ease.l2:g})"] = evaluate_ranking(ease.scores, data, "test", args.batch_size)
    # How far a mean over this few test users moves by chance: EASE's per-user spread / sqrt(users).
    test = data.rows("test", 0, data.size("test"))
    per_user = ranking_metrics(ease.scores(test), test["heldout"], test["x"])["ndcg@100"]
    print(f"standard error of a test NDCG@100 (EASE's per-user spread): {float(per_user.std() / per_user.numel() ** 0.5):.3f}")
    print(f"baselines: {time.perf_counter() - started:.1f} s")
    for label, run in (("Mult-DAE", args.dae), ("Mult-VAE", args.vae)):
        if run:
            final = json.loads((Path(run) / "final.json").read_text())
            rows[f"{label} (epoch {final['best_epoch']} of {final['epochs']})"] = {key: final[f"test_{key}"] for key in METRICS}

    print("\n| model (ML-100K test users) | NDCG@100 | Recall@20 | Recall@50 |\n|---|---|---|---|")
    for label, metrics in rows.items():
        print(f"| {label} | " + " | ".join(f"{metrics[key]:.3f}" for key in METRICS) + " |")
    for label, values in PAPER_ML20M.items():
        print(f"| {label} | " + " | ".join(f"{value:.3f}" for value in values) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
