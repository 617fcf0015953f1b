"""Seed and grid sweeps: the cross product of experiments, grid values and seeds, one ordinary run
folder per point, run by ``--jobs`` processes, resumable as a whole, summarized from the folders.

Layout of ``--out``::

    sweep.json                    what the last sweep command asked for (experiments, grid, seeds, --set)
    summary.md, summary.csv       mean ± std over seeds of every final.json metric, per grid point
    <grid point>/summary.md, .csv the same for one grid point
    <grid point>/seed<S>/         an ordinary run folder (evaluate, analyze, --resume work on it),
                                  plus train.log (the run's messages) and sweep.json (its sessions)

A grid point's folder is named by its settings (``train.lr=0.001,model.latent_dim=16``), preceded by
the experiment file's name when the sweep runs several; ``base`` when there is neither.

Each point runs ``python -m pyrovae train EXPERIMENT --out FOLDER --no-progress --set ...`` in a
process of its own, with ``OMP_NUM_THREADS`` set to ``threads`` (one torch thread by default). Run
the same command again after a kill: a point whose folder holds ``final.json`` of the same resolved
experiment is skipped, one with a checkpoint is resumed (``--resume``), the others start afresh.
The summary is regenerated from the run folders every time, never kept by hand.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pyrovae.config import RESUMABLE_SETTINGS, load_experiment, load_toml, resolve_config
from pyrovae.errors import ConfigError
from pyrovae.train.progress import duration
from pyrovae.files import write_text_atomically
from pyrovae.run_folder import differences, holds_a_run, locked_folder

PLAN_FILE = "sweep.json"
LOG_FILE = "train.log"
SESSIONS_FILE = "sweep.json"
SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"
LOCK_FILE = ".pyrovae-sweep.lock"
# Written into a run folder before its first training, so that train.log may sit beside the run
# (pyrovae.experiment.RUN_MARKER: a folder with it is pyrovae's, not the user's).
RUN_MARKER = ".pyrovae-run"
# The overview table's columns, where the runs report them.
OVERVIEW_METRICS = (
    "test_elbo",
    "test_iwae",
    "test_log_likelihood",
    "test_perplexity",
    "test_kl",
    "test_accuracy",
    "test_cluster_accuracy",
    "test_mutual_information",
    "test_active_units",
    "best_epoch",
)


# --- the command's arguments -------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,3,7"``; ``"0-2,5"``. Refused in one line otherwise."""
    seeds: list[int] = []
    for piece in text.split(","):
        match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", piece)
        if match is None:
            raise ConfigError(f"--seeds {text!r}: expected integers and ranges such as 0-4 or 0,3,7")
        low, high = int(match.group(1)), int(match.group(2) if match.group(2) is not None else match.group(1))
        if high < low:
            raise ConfigError(f"--seeds {text!r}: the range {low}-{high} is empty")
        seeds += range(low, high + 1)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} names a seed twice")
    return seeds


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,...`` at the commas outside brackets and quotes: ``[16,32],[64]`` is two values."""
    values, depth, quote, current = [], 0, None, ""
    for character in text:
        if quote:
            quote = None if character == quote else quote
        elif character in "\"'":
            quote = character
        elif character in "[{":
            depth += 1
        elif character in "]}":
            depth -= 1
        elif character == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += character
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["train.lr=1e-3,3e-4", "model.hidden=[64],[128]"]`` -> [(key, [value text, ...]), ...]; each
    value is TOML (a bare word is a string), as with ``--set``."""
    grid = []
    for item in items:
        key, separator, values = item.partition("=")
        key = key.strip()
        if not separator or not key or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected section.key=value1,value2,...")
        texts = split_values(values)
        if any(not text for text in texts):
            raise ConfigError(f"--grid {item!r}: an empty value (two commas in a row?)")
        if key in (existing for existing, _ in grid):
            raise ConfigError(f"--grid names {key} twice; give its values once, separated by commas")
        grid.append((key, texts))
    return grid


def _folder_part(key: str, text: str) -> str:
    """``key=value`` as a folder name: ``model.hidden=[64, 32]`` -> ``model.hidden=64+32``."""
    return f"{key}={re.sub(r'[^A-Za-z0-9._+=-]', '', text.replace(',', '+'))}"


# --- the points ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One run of the sweep: an experiment file at one grid point with one seed."""

    experiment: Path
    group: str  # the grid point's folder, relative to the sweep's --out
    settings: tuple[tuple[str, str], ...]  # the grid point's (key, value text)
    seed: int | None  # None: the experiment's own seed
    overrides: tuple[str, ...]  # every --set of the run: the sweep's, the grid point's, the seed's
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.group}/{self.folder.name}"


@dataclass
class Sweep:
    """What ``pyrovae sweep`` runs: ``experiments`` x grid x ``seeds`` into ``out``. ``seed_keys`` are
    the settings a seed is written to (``seed``; add ``data.seed`` where the loader's draw, e.g. which
    labels are kept, should change with it); ``overrides`` are ``--set`` for every point."""

    experiments: list[Path]
    out: Path
    seeds: list[int] | None = None
    grid: list[tuple[str, list[str]]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    seed_keys: tuple[str, ...] = ("seed",)

    def __post_init__(self):
        self.experiments = [Path(path) for path in self.experiments]
        self.out = Path(self.out)
        stems = [path.stem for path in self.experiments]
        if len(set(stems)) != len(stems):
            raise ConfigError(f"the experiments {', '.join(map(str, self.experiments))} share a file name; their folders would clash")
        if not self.experiments:
            raise ConfigError("a sweep needs at least one experiment file")
        if not self.seed_keys:
            raise ConfigError("--seed-keys names no setting")

    def points(self) -> list[Point]:
        points = []
        keys = [key for key, _ in self.grid]
        for experiment in self.experiments:
            for values in itertools.product(*(texts for _, texts in self.grid)):
                settings = tuple(zip(keys, values))
                parts = ([experiment.stem] if len(self.experiments) > 1 else []) + [_folder_part(k, v) for k, v in settings]
                group = ",".join(parts) or "base"
                for seed in self.seeds if self.seeds is not None else [None]:
                    seed_sets = [f"{key}={seed}" for key in self.seed_keys] if seed is not None else []
                    overrides = (*self.overrides, *(f"{k}={v}" for k, v in settings), *seed_sets)
                    if seed is None:
                        seed_value = self._resolved_seed(experiment, overrides)
                        folder = self.out / group / f"seed{seed_value}"
                    else:
                        folder = self.out / group / f"seed{seed}"
                    points.append(Point(experiment, group, settings, seed, overrides, folder))
        return points

    def _resolved_seed(self, experiment: Path, overrides: tuple[str, ...]) -> int:
        return int(load_experiment(experiment, list(overrides)).get("seed", 0))

    def plan(self) -> dict:
        return {
            "experiments": [str(path.resolve()) for path in self.experiments],
            "grid": {key: texts for key, texts in self.grid},
            "seeds": self.seeds,
            "seed_keys": list(self.seed_keys),
            "set": list(self.overrides),
        }


def resolved(point: Point) -> dict:
    """The point's resolved experiment (every default written out); a mistake is a ConfigError
    that names the point."""
    try:
        return resolve_config(load_experiment(point.experiment, list(point.overrides)))
    except ConfigError as error:
        raise ConfigError(f"sweep point {point.name}: {error}") from None


def _folder_config(folder: Path) -> dict | None:
    """The resolved experiment of the run in ``folder`` (its ``config.toml``); None without one."""
    try:
        return resolve_config(load_toml(folder / "config.toml"))
    except (OSError, ConfigError):
        return None


def foreign_settings(point: Point, config: dict) -> list[str]:
    """The settings in which the run already in the point's folder differs from the point's
    experiment beyond what a resume may change (``RESUMABLE_SETTINGS``): not empty means the folder
    holds another experiment (the sweep ran before with another ``--set``), which it cannot continue."""
    saved = _folder_config(point.folder) if holds_a_run(point.folder) else None
    return [] if saved is None else differences(saved, config, RESUMABLE_SETTINGS)


def status(point: Point, config: dict) -> str:
    """``finished`` (``final.json`` of the same resolved experiment, and the last session the sweep
    ran there ended well), ``resume`` (a checkpoint to continue from; also a run stopped after it
    wrote final.json but before its plots) or ``start``."""
    folder = point.folder
    if (folder / "final.json").exists() and (folder / "config.toml").exists() and _last_session_ended_well(folder):
        try:
            same = resolve_config(load_toml(folder / "config.toml")) == config
        except ConfigError:
            same = False
        if same:
            return "finished"
    return "resume" if holds_a_run(folder) else "start"


# --- running ------------------------------------------------------------------------------------------


@dataclass
class _Running:
    point: Point
    process: subprocess.Popen
    started: float
    resumed: bool
    log: Any


@dataclass
class SweepResult:
    points: list[Point]
    skipped: list[Point]
    finished: list[Point]
    failed: list[tuple[Point, int, str]]


def _command(point: Point, resume: bool) -> list[str]:
    sets = [item for override in point.overrides for item in ("--set", override)]
    return [sys.executable, "-m", "pyrovae", "train", str(point.experiment), "--out", str(point.folder), "--no-progress", *sets] + (
        ["--resume"] if resume else []
    )


def _last_session_ended_well(folder: Path) -> bool:
    """Whether the last ``pyrovae train`` the sweep ran in ``folder`` exited 0 (True where the sweep
    ran none: a run trained by hand)."""
    try:
        sessions = json.loads((folder / SESSIONS_FILE).read_text()).get("sessions", [])
    except (OSError, ValueError):
        return True
    return not sessions or sessions[-1].get("exit_code") == 0


def _default_interrupt() -> None:
    """In the child, before it runs: Ctrl-C (SIGINT) stops it even where the sweep was started with
    SIGINT ignored (a script's background job), so the sweep can stop its runs at once."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _record_session(point: Point, started: float, resumed: bool, code: int | None) -> None:
    path = point.folder / SESSIONS_FILE
    sessions = json.loads(path.read_text()).get("sessions", []) if path.exists() else []
    sessions.append({"seconds": round(time.perf_counter() - started, 1), "resumed": resumed, "exit_code": code})
    write_text_atomically(path, json.dumps({"overrides": list(point.overrides), "sessions": sessions}, indent=2) + "\n")


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("pyrovae train: error:") or line.startswith("Traceback")]
    if errors and errors[-1].startswith("pyrovae"):
        return errors[-1]
    return lines[-1] if lines else ""


def _epochs_done(folder: Path) -> int:
    try:
        with open(folder / "metrics.jsonl", "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


def run_sweep(
    sweep: Sweep,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    poll_seconds: float = 0.5,
) -> SweepResult:
    """Run every point not finished yet, ``jobs`` at a time, then write the summary. Returns what
    was skipped, finished and failed (a failed point does not stop the others)."""
    from tqdm.auto import tqdm

    if jobs < 1 or threads < 1:
        raise ConfigError(f"--jobs and --threads must be >= 1, got {jobs} and {threads}")
    say = say or (lambda message: tqdm.write(message, file=sys.stderr))
    points = sweep.points()
    configs = {point: resolved(point) for point in points}  # every mistake before anything runs
    with locked_folder(sweep.out, LOCK_FILE, "sweep"):
        return _sweep_locked(sweep, points, configs, jobs, threads, progress, say, poll_seconds)


def _sweep_locked(sweep, points, configs, jobs, threads, progress, say, poll_seconds) -> SweepResult:
    from tqdm.auto import tqdm

    for point in points:
        changed = foreign_settings(point, configs[point])
        if changed:
            raise ConfigError(
                f"sweep point {point.name}: {point.folder} holds a run of another experiment (it differs in "
                f"{', '.join(changed)}), which this sweep cannot continue; sweep into a new --out"
            )
        trained, planned = _epochs_done(point.folder), int(configs[point]["train"]["epochs"])
        if trained > planned:
            raise ConfigError(
                f"sweep point {point.name}: {point.folder} has trained {trained} epochs, more than train.epochs = {planned}; "
                "a sweep may raise train.epochs, not lower it (or sweep into a new --out)"
            )
    write_text_atomically(sweep.out / PLAN_FILE, json.dumps(sweep.plan(), indent=2) + "\n")
    todo = {point: status(point, configs[point]) for point in points}
    skipped = [point for point in points if todo[point] == "finished"]
    pending = [point for point in points if todo[point] != "finished"]
    epochs = {point: int(configs[point]["train"]["epochs"]) for point in points}
    if skipped:
        say(f"sweep: {len(skipped)} of {len(points)} points already finished (skipped)")
    resumed = sum(todo[point] == "resume" for point in pending)
    if pending:
        say(f"sweep: running {len(pending)} points ({resumed} resumed from their checkpoints), {min(jobs, len(pending))} at a time")
    bar = tqdm(
        total=sum(epochs.values()),
        initial=sum(epochs[point] for point in skipped),
        desc="sweep",
        unit="epoch",
        disable=not progress or not sys.stderr.isatty(),
        dynamic_ncols=True,
        file=sys.stderr,
    )
    finished, failed = [], []
    try:
        _run_points(pending, todo, epochs, skipped, jobs, threads, bar, say, finished, failed, len(points), poll_seconds)
    finally:
        bar.close()
    write_summary(sweep)
    return SweepResult(points, skipped, finished, failed)


def _run_points(pending, todo, epochs, skipped, jobs, threads, bar, say, finished, failed, total, poll_seconds) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    queue, running, done = list(pending), [], len(skipped)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                point = queue.pop(0)
                point.folder.mkdir(parents=True, exist_ok=True)
                (point.folder / RUN_MARKER).touch()
                resume = todo[point] == "resume"
                log = open(point.folder / LOG_FILE, "a")
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(_command(point, resume))}\n")
                log.flush()
                process = subprocess.Popen(
                    _command(point, resume), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment,
                    preexec_fn=_default_interrupt if os.name == "posix" else None,
                )
                running.append(_Running(point, process, time.perf_counter(), resume, log))
            time.sleep(poll_seconds)
            for item in [item for item in running if item.process.poll() is not None]:
                running.remove(item)
                item.log.close()
                code = item.process.returncode
                _record_session(item.point, item.started, item.resumed, code)
                done += 1
                took = duration(time.perf_counter() - item.started)
                if code == 0:
                    finished.append(item.point)
                    say(f"[{done}/{total}] {item.point.name}: done in {took}{_headline(item.point.folder)}")
                else:
                    reason = _last_line(item.point.folder / LOG_FILE)
                    failed.append((item.point, code, reason))
                    say(f"[{done}/{total}] {item.point.name}: FAILED (exit code {code}) after {took}: {reason} (see {item.point.folder / LOG_FILE})")
            counted = {point for point in finished} | set(skipped)
            bar.n = sum(epochs[p] for p in counted) + sum(min(_epochs_done(item.point.folder), epochs[item.point]) for item in running)
            bar.refresh()
    finally:
        for item in running:  # interrupted: stop the runs; their checkpoints let the next sweep resume them
            if item.process.poll() is None:
                item.process.send_signal(signal.SIGINT)
        for item in running:
            try:
                item.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                item.process.kill()
                item.process.wait()
            item.log.close()
            _record_session(item.point, item.started, item.resumed, item.process.returncode)


def _headline(folder: Path) -> str:
    try:
        final = json.loads((folder / "final.json").read_text())
    except (OSError, ValueError):
        return ""
    shown = [f"{key} {_number(final[key])}" for key in OVERVIEW_METRICS if key in final and key != "best_epoch"][:2]
    return f" ({final.get('epochs', '?')} epochs, best {final.get('best_epoch', '?')}" + "".join(f", {item}" for item in shown) + ")"


# --- the summary --------------------------------------------------------------------------------------


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.6g}"


@dataclass
class GroupSummary:
    """One grid point: its seeds' run folders and, for each metric, the values per seed."""

    group: str
    settings: tuple[tuple[str, str], ...]
    experiment: Path
    seeds: list[str]  # folder names (seed0, seed1 ...)
    missing: list[str]  # seeds without final.json
    values: dict[str, dict[str, float]]  # metric -> seed -> value

    def stats(self, metric: str) -> tuple[int, float | None, float | None]:
        values = list(self.values.get(metric, {}).values())
        if not values:
            return 0, None, None
        mean = statistics.fmean(values)
        return len(values), mean, statistics.stdev(values) if len(values) > 1 else None

    def cell(self, metric: str) -> str:
        count, mean, std = self.stats(metric)
        if not count:
            return "-"
        return _number(mean) + (f" ± {_number(std)}" if std is not None else "")


def _run_values(folder: Path) -> dict[str, float] | None:
    """Every numeric ``final.json`` entry, and from the folder: the train seconds (sum of the epochs'
    ``seconds`` in metrics.jsonl) and the wall seconds (the sweep's sessions, where it ran them)."""
    try:
        final = json.loads((folder / "final.json").read_text())
    except (OSError, ValueError):
        return None
    values = {key: value for key, value in final.items() if _numeric(value)}
    values.pop("train_seconds_this_session", None)  # one session's time: the sums below replace it
    try:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        values["train_seconds"] = round(sum(float(record.get("seconds", 0.0)) for record in records), 1)
    except (OSError, ValueError):
        pass
    sessions = folder / SESSIONS_FILE
    if sessions.exists():
        try:
            values["wall_seconds"] = round(sum(s["seconds"] for s in json.loads(sessions.read_text())["sessions"]), 1)
        except (ValueError, KeyError, TypeError):
            pass
    return values


def summarize(sweep: Sweep) -> list[GroupSummary]:
    """The summary of every grid point, read from the run folders as they are now."""
    groups: dict[str, GroupSummary] = {}
    for point in sweep.points():
        group = groups.setdefault(point.group, GroupSummary(point.group, point.settings, point.experiment, [], [], {}))
        seed = point.folder.name
        group.seeds.append(seed)
        values = _run_values(point.folder)
        if values is not None and foreign_settings(point, resolved(point)):
            values = None  # a run of another experiment (an earlier --set) is not this point's result
        if values is None:
            group.missing.append(seed)
            continue
        for metric, value in values.items():
            group.values.setdefault(metric, {})[seed] = value
    return list(groups.values())


def _metrics(groups: list[GroupSummary]) -> list[str]:
    names: dict[str, None] = {}
    for group in groups:
        names.update(dict.fromkeys(group.values))
    return list(names)


def summary_csv(groups: list[GroupSummary]) -> str:
    """One row per grid point and metric: the grid settings, n, mean, std (over seeds; sample std,
    empty for one seed) and each seed's value."""
    seeds = list(dict.fromkeys(seed for group in groups for seed in group.seeds))
    keys = list(dict.fromkeys(key for group in groups for key, _ in group.settings))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["point", "experiment", *keys, "metric", "n", "mean", "std", *seeds])
    for group in groups:
        settings = dict(group.settings)
        for metric in _metrics([group]):
            count, mean, std = group.stats(metric)
            per_seed = group.values[metric]
            writer.writerow(
                [group.group, group.experiment.stem, *(settings.get(key, "") for key in keys), metric, count, mean, "" if std is None else std]
                + [per_seed.get(seed, "") for seed in seeds]
            )
    return buffer.getvalue()


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(sweep: Sweep, groups: list[GroupSummary]) -> str:
    shown = [metric for metric in OVERVIEW_METRICS if any(metric in group.values for group in groups)]
    lines = [
        f"# Sweep {sweep.out.name}",
        "",
        f"Regenerated from the run folders by `pyrovae sweep` ({time.strftime('%Y-%m-%d %H:%M')}); mean ± sample standard "
        "deviation over seeds, each seed's value in the sections below.",
        "",
        "Experiments: " + ", ".join(f"`{path}`" for path in sweep.experiments)
        + (f"; --set {' '.join(sweep.overrides)}" if sweep.overrides else "")
        + (f"; seeds {', '.join(map(str, sweep.seeds))} (written to {', '.join(sweep.seed_keys)})" if sweep.seeds is not None else ""),
        "",
        _table(
            ["point", "runs", *shown, "train s (mean)"],
            [
                [group.group, f"{len(group.seeds) - len(group.missing)}/{len(group.seeds)}", *(group.cell(m) for m in shown), group.cell("train_seconds")]
                for group in groups
            ],
        ),
    ]
    for group in groups:
        lines += ["", f"## {group.group}", "", group_markdown(group)]
    return "\n".join(lines) + "\n"


def group_markdown(group: GroupSummary) -> str:
    """One grid point's table: every metric's mean ± std and each seed's value."""
    seeds = [seed for seed in group.seeds if seed not in group.missing]
    rows = [[metric, group.cell(metric), *(_number(group.values[metric].get(seed)) for seed in seeds)] for metric in _metrics([group])]
    missing = f"Not finished: {', '.join(group.missing)}.\n\n" if group.missing else ""
    return missing + (_table(["metric", "mean ± std", *seeds], rows) if rows else "No finished run yet.")


def write_summary(sweep: Sweep) -> tuple[Path, Path]:
    """``summary.md`` and ``summary.csv`` in the sweep's folder, from the run folders as they are."""
    groups = summarize(sweep)
    markdown, table = sweep.out / SUMMARY_MD, sweep.out / SUMMARY_CSV
    write_text_atomically(markdown, summary_markdown(sweep, groups))
    write_text_atomically(table, summary_csv(groups))
    for group in groups:  # and each grid point's own, beside its seeds' folders
        folder = sweep.out / group.group
        if folder.is_dir():
            write_text_atomically(folder / SUMMARY_MD, f"# {group.group}\n\n{group_markdown(group)}\n")
            write_text_atomically(folder / SUMMARY_CSV, summary_csv([group]))
    return markdown, table

