"""Checkpoints that are never half-written: write a temporary file beside the target,
fsync it, then ``os.replace`` it over the target (atomic on POSIX), and fsync the folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

LATEST = "latest.pt"
BEST = "best.pt"


def _replace_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files left by a process killed mid-write (the targets are intact)."""
    directory = Path(directory)
    stale = sorted(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    _replace_atomically(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=device, weights_only=False)


def write_jsonl(records: Iterable[dict], path: str | Path) -> None:
    """Rewrite a whole JSON-lines file atomically (used on resume, from the checkpoint's history)."""
    text = "".join(json.dumps(record) + "\n" for record in records)
    _replace_atomically(Path(path), lambda handle: handle.write(text.encode()))


def append_jsonl(record: dict, path: str | Path) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
