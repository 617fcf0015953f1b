"""A run folder's own files, and the checks that keep them and its checkpoints one run.

- **The lock.** While a run trains, it holds ``.pyrovae.lock`` (an OS file lock, released even when
  the process is killed); a second ``train`` into the folder fails at once. ``evaluate``, ``sample``
  and ``analyze`` take no lock, and say so when they read a run that is training.
- **Atomic files.** ``config.toml``, ``final.json`` and ``vocabulary.json`` are written whole or not
  at all (:mod:`pyrovae.files`).
- **Copies in every checkpoint.** Each checkpoint keeps the texts of ``config.toml`` and
  ``vocabulary.json`` (``run_files``) and the resolved config (``fingerprint``). A missing or
  damaged file is restored from the newest readable checkpoint, with a message.
- **One run.** A checkpoint whose fingerprint differs from the folder's config in a setting that
  changes the trained run (a checkpoint copied from another run), or whose vocabulary differs from
  the one the data give, is refused by name.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from filelock import FileLock, Timeout

from pyrovae.config import dump_toml, is_allowed_setting, load_toml
from pyrovae.errors import CheckpointError, ConfigError, RunFolderError
from pyrovae.files import write_text_atomically
from pyrovae.train import LATEST, previous_path
from pyrovae.train.checkpoint import read_metadata

CONFIG_FILE = "config.toml"
FINAL_FILE = "final.json"
# Text data: the token list, so evaluate and sample map ids to the same words.
VOCABULARY_FILE = "vocabulary.json"
# The small files every checkpoint keeps a copy of.
RUN_FILES = (CONFIG_FILE, VOCABULARY_FILE)
# Held (an OS file lock, released even when the process is killed) while a run trains.
LOCK_FILE = ".pyrovae.lock"
# Written when pyrovae makes a folder a run folder: a folder without it (or a checkpoint) that
# holds files is the user's, and is not written into.
RUN_MARKER = ".pyrovae-run"


@contextmanager
def locked_folder(folder: Path, lock_name: str, busy: str):
    """Make ``folder`` (refusing a path through a file) and hold its lock file ``lock_name``, or fail
    at once, saying ``busy``, if another process holds it."""
    clash = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if clash is not None:
        raise RunFolderError(f"--out {folder}: {clash} is a file, not a folder; choose a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / lock_name))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderError(f"{folder} is in use by another pyrovae {busy} (it holds {folder / lock_name})") from None
    try:
        yield
    finally:
        lock.release()


def locked_run_folder(run_dir: Path):
    """Hold ``run_dir``'s lock while a run trains, or fail at once if another process holds it."""
    return locked_folder(run_dir, LOCK_FILE, "process; wait for it to finish, or train into another --out folder")


def training_now(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s lock (is training into it). Called by the
    commands that only read a run folder, never by the process that holds the lock."""
    if not (run_dir / LOCK_FILE).exists():
        return False
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:  # a read-only folder: no way to ask, and nothing this process could clash with
        return False
    lock.release()
    return False


def holds_a_run(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return any((checkpoints / name).exists() for name in (LATEST, previous_path(LATEST)))


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(saved: dict, current: dict, allowed: Iterable[str]) -> list[str]:
    """The settings (``section.key``) where two resolved configs differ, except those ``allowed`` to;
    tuples and lists compare equal, and a key absent on one side equals ``None`` on the other."""
    allowed = tuple(allowed)
    plain = lambda config: flatten(json.loads(json.dumps(config, default=str)))  # noqa: E731 - tuples -> lists, paths -> str
    first, second = plain(saved), plain(current)
    return sorted(key for key in set(first) | set(second) if not is_allowed_setting(key, allowed) and first.get(key) != second.get(key))


def _problem(path: Path) -> str | None:
    """Why a run file cannot be read (``"missing"``, ``"not valid TOML (...)"``), or None."""
    if not path.exists():
        return "missing"
    try:
        if path.suffix == ".toml":
            missing = _incomplete(load_toml(path))
            if missing:
                return f"damaged (cut short: it has no {missing})"
        else:
            json.loads(path.read_text(encoding="utf-8"))
    except (ConfigError, ValueError, OSError) as error:
        return f"damaged ({' '.join(str(error).split())[:120]})"
    return None


# Every run folder's config.toml holds these (the resolved config writes every default out).
NAMED_PARTS = ("data", "model", "guide", "objective")
SETTINGS_TABLES = ("train", "evaluate")


def _incomplete(raw: dict) -> str | None:
    """What a run folder's ``config.toml`` lacks (``"[model] name"``), or None: a file cut short
    can still be valid TOML."""
    for section in NAMED_PARTS:
        if not isinstance(raw.get(section), dict) or "name" not in raw[section]:
            return f"[{section}] name"
    return next((f"[{section}] table" for section in SETTINGS_TABLES if not isinstance(raw.get(section), dict)), None)


def restore_run_files(run_dir: Path) -> list[str]:
    """Write ``config.toml`` and ``vocabulary.json`` anew from the newest readable checkpoint's copies
    where they are missing or damaged (a ``config.toml`` from the checkpoint's resolved config where it
    holds no copy, as checkpoints of earlier versions), saying so on stderr. Returns the files restored."""
    problems = {name: _problem(run_dir / name) for name in RUN_FILES}
    problems = {name: problem for name, problem in problems.items() if problem is not None}
    if not problems or not holds_a_run(run_dir) and not (run_dir / "checkpoints" / "best.pt").exists():
        return []
    found = read_metadata(run_dir / "checkpoints")
    if found is None:
        return []
    source, metadata = found
    restored = []
    for name, problem in problems.items():
        text = metadata["run_files"].get(name)
        if text is None and name == CONFIG_FILE and metadata["fingerprint"]:
            text = dump_toml(metadata["fingerprint"])
        if text is None:
            continue
        write_text_atomically(run_dir / name, text)
        print(f"pyrovae: {run_dir / name} was {problem}; restored it from {source}", file=sys.stderr)
        restored.append(name)
    return restored


def read_run_files(run_dir: Path) -> dict[str, str]:
    """The texts of the run folder's small files, for the checkpoints to keep."""
    return {name: (run_dir / name).read_text(encoding="utf-8") for name in RUN_FILES if (run_dir / name).exists()}


# Options added to pyrovae after run folders were written, with the value that reproduces how those
# runs trained. A checkpoint's fingerprint that lacks one (or holds None for it) is read with this
# value, where today's config has the option; every other absence stays a difference. Add a line
# here with every new option whose default is not None.
OPTIONS_ADDED_SINCE = {
    "train.lr_plateau_patience": 0,
    "train.lr_plateau_factor": 0.5,
    "train.lr_plateau_max_decays": 0,
    "train.lr_plateau_reload_best": False,
    "model.bag_of_words_weight": 0.0,
    "data.limit": 0,  # MNIST and Fashion-MNIST (text loaders always had it)
}


def with_added_options(fingerprint: dict, config: dict) -> dict:
    """A checkpoint's flattened fingerprint with :data:`OPTIONS_ADDED_SINCE` filled in where it lacks
    them and ``config`` (today's resolved config) has them."""
    flat, current = flatten(fingerprint), flatten(config)
    for key, value in OPTIONS_ADDED_SINCE.items():
        if flat.get(key) is None and key in current:
            flat[key] = value
    return flat


def check_checkpoint_fingerprint(saved: dict, config: dict, path: Path, allowed: Iterable[str], what: str) -> None:
    """Refuse a checkpoint written by another experiment: its resolved config differs from ``config``
    in a setting not ``allowed`` to differ (options added since it was written read as
    :data:`OPTIONS_ADDED_SINCE` says). Checkpoints without a fingerprint pass."""
    fingerprint = saved.get("fingerprint")
    if not isinstance(fingerprint, dict):
        return
    saved_flat, current_flat = with_added_options(fingerprint, config), flatten(config)
    changed = differences(saved_flat, current_flat, allowed)
    if changed:
        shown = ", ".join(f"{key} ({saved_flat.get(key)!r} there, {current_flat.get(key)!r} here)" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise CheckpointError(
            f"{what}: {path} was written by another experiment: it differs from the run folder's {CONFIG_FILE} in "
            f"{shown}{more}; put back this run's checkpoint, or train into a new --out folder"
        )


def check_checkpoint_vocabulary(saved: dict, vocabulary, path: Path, what: str) -> None:
    """Refuse data whose vocabulary differs from the one the checkpoint was trained with (its kept
    copy of ``vocabulary.json``): token ids would mean other words. Checkpoints without a copy pass."""
    text = (saved.get("run_files") or {}).get(VOCABULARY_FILE)
    if vocabulary is None or text is None:
        return
    trained = json.loads(text).get("tokens", [])
    current = list(vocabulary.tokens)
    if trained != current:
        first = next((index for index, (a, b) in enumerate(zip(trained, current)) if a != b), min(len(trained), len(current)))
        raise CheckpointError(
            f"{what}: the vocabulary ({len(current)} tokens) differs from the one {path} was trained with "
            f"({len(trained)} tokens; first difference at id {first}); token ids would mean other words. "
            f"Delete {VOCABULARY_FILE} to have the trained one restored, or pass the data the run was trained on"
        )
