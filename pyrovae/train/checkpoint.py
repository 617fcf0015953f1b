"""Checkpoints that are never half-written, never run code when loaded, and survive damage.

Writing (:mod:`pyrovae.files`): a temporary file beside the target is fsynced, the current target (if
any) becomes the *previous* copy (``latest.prev.pt``, a hard link swapped in atomically), the
temporary is renamed over the target (atomic on POSIX), and the folder is fsynced. A write that
fails (a full disk) says so in one line, naming the intact files. A kill at any instant leaves the
target whole. If the target is damaged anyway (a full disk, a file truncated by hand),
:func:`load_checkpoint_or_previous` falls back to the previous copy.

Loading uses ``torch.load(..., weights_only=True)``: a checkpoint holds tensors and plain Python
values only, so a crafted file cannot run code while it is unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from pyrovae.errors import CheckpointError, UnsafeCheckpointError
from pyrovae.files import previous_path, remove_stale_temporaries, replace_atomically  # noqa: F401 - re-exported

LATEST = "latest.pt"
BEST = "best.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors and plain Python values) to ``path``, keeping the file it replaces
    as ``previous_path(path)``."""
    replace_atomically(Path(path), lambda handle: torch.save(state, handle), keep_previous=True)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain values only). Raises :class:`CheckpointError`
    naming the file for a missing, damaged or unsafe one."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint {path}; train first")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses globals outside torch's allow-list: a file that is not pyrovae's.
        # Name what the file asks for; torch's advice to load it unsafely is not repeated.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        asked = f"it asks for {found.group(1)}" if found else "it asks for objects other than tensors and plain values"
        raise UnsafeCheckpointError(
            f"{path} is refused, not loaded: it holds code, not only tensors and plain values ({asked}); "
            "pyrovae never unpickles such a file"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is damaged or truncated ({reason})") from None


def load_checkpoint_or_previous(path: str | Path, device: torch.device | str = "cpu", warn: Callable[[str], None] = print) -> dict[str, Any]:
    """Load ``path``; if it is missing or damaged, fall back to its previous copy with a message.
    With nothing to fall back to, raise :class:`CheckpointError` saying what to do."""
    path = Path(path)
    previous = previous_path(path)
    try:
        return load_checkpoint(path, device)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as error:
        latest = path.with_name(LATEST)
        advice = (
            "the run's latest.pt is there: evaluate, sample or analyze it with --checkpoint latest"
            if path.name == BEST and latest.exists() else f"start the run again in a new --out folder (or delete {path.parent.parent})"
        )
        if not previous.exists():
            raise CheckpointError(f"{error}, and there is no previous checkpoint ({previous.name}) to fall back to; {advice}") from None
        try:
            saved = load_checkpoint(previous, device)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as second:
            raise CheckpointError(f"{error}, and so is its previous copy ({second}); {advice}") from None
        warn(f"{error}; using the previous checkpoint {previous} (epoch {saved['state']['epoch']}) instead")
        return saved


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Rewrite a whole JSON-lines file atomically (used on resume, from the checkpoint's history)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    replace_atomically(Path(path), lambda handle: handle.write(text.encode()))


def append_jsonl(record: dict, path: str | Path) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# The checkpoints that may hold a run folder's metadata (fingerprint, run files), newest first.
METADATA_SOURCES = (LATEST, "latest.prev.pt", BEST, "best.prev.pt")


def read_metadata(folder: str | Path) -> tuple[Path, dict] | None:
    """(checkpoint, {"fingerprint": ..., "run_files": {...}, "epoch": N}) of the newest readable checkpoint in
    ``folder`` (``run_dir/checkpoints``), read memory-mapped (the tensors are not loaded); None when
    there is none. A damaged or unsafe file is skipped."""
    for name in METADATA_SOURCES:
        path = Path(folder) / name
        if not path.exists():
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - any unreadable file is skipped; the next copy may serve
            continue
        if isinstance(saved, dict):
            state = saved.get("state")
            epoch = state.get("epoch") if isinstance(state, dict) else None
            return path, {"fingerprint": saved.get("fingerprint"), "run_files": dict(saved.get("run_files") or {}), "epoch": epoch}
    return None


PARTS = ("model", "guide", "state")


def check_contents(saved: Any, path: str | Path, needs: tuple[str, ...] = PARTS) -> dict:
    """``saved`` if it is a pyrovae checkpoint holding ``needs`` with finite parameters; else a
    :class:`CheckpointError` in one line that names the file and what is wrong."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds a {type(saved).__name__}, not a pyrovae checkpoint (a dict of model, guide, state)")
    missing = [key for key in needs if key not in saved]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(repr(key) for key in missing)} entry; it was not written by pyrovae train")
    for part in ("model", "guide"):
        states = saved.get(part)
        if part in needs and not isinstance(states, dict):
            raise CheckpointError(f"{path}: its {part!r} entry is a {type(states).__name__}, not a state dict of tensors")
        for name, tensor in (states or {}).items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"{path} holds non-finite parameters ({part} {name}); it was damaged or saved from a diverged "
                    f"run: use another checkpoint ({'best' if 'latest' in Path(path).name else 'latest'}, or the .prev.pt copy)"
                )
    return saved


def load_into(module: torch.nn.Module, state: dict, path: str | Path, part: str) -> None:
    """``module.load_state_dict(state)``, or a :class:`CheckpointError` in one line naming the first
    mismatch (a missing or extra key, another size)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error).strip()]
        raise CheckpointError(
            f"{path} does not fit this {part} ({type(module).__name__}): {details[0]}; the checkpoint was written "
            f"by another experiment, or the config was edited"
        ) from None
