"""Checkpoints that are never half-written, never run code when loaded, and survive damage.

Writing: a temporary file beside the target is fsynced, the current target (if any) becomes the
*previous* copy (``latest.prev.pt``, a hard link swapped in atomically), the temporary is renamed
over the target (atomic on POSIX), and the folder is fsynced. A kill at any instant leaves the
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
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from pyrovae.errors import CheckpointError, UnsafeCheckpointError

LATEST = "latest.pt"
BEST = "best.pt"


def previous_path(path: str | Path) -> Path:
    """Where the copy of ``path`` before its last write is kept: ``latest.pt`` -> ``latest.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _replace_atomically(path: Path, write: Callable, keep_previous: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            _keep_copy(path, previous_path(path))
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    _fsync_directory(path.parent)


def _keep_copy(path: Path, copy: Path) -> None:
    """Make ``copy`` hold what ``path`` holds now, atomically, leaving ``path`` in place: a hard
    link (no bytes copied), or a real copy where the file system has no hard links."""
    staged = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:
        shutil.copyfile(path, staged)
    os.replace(staged, copy)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files left by a process killed mid-write (the targets are intact)."""
    directory = Path(directory)
    stale = sorted(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors and plain Python values) to ``path``, keeping the file it replaces
    as ``previous_path(path)``."""
    _replace_atomically(Path(path), lambda handle: torch.save(state, handle), keep_previous=True)


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
        if not previous.exists():
            raise CheckpointError(
                f"{error}, and there is no previous checkpoint ({previous.name}) to fall back to; "
                f"start the run again in a new --out folder (or delete {path.parent.parent})"
            ) from None
        saved = load_checkpoint(previous, device)
        warn(f"{error}; using the previous checkpoint {previous} (epoch {saved['state']['epoch']}) instead")
        return saved


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Rewrite a whole JSON-lines file atomically (used on resume, from the checkpoint's history)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    _replace_atomically(Path(path), lambda handle: handle.write(text.encode()))


def append_jsonl(record: dict, path: str | Path) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
