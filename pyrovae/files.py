"""Files that are never half-written: every file pyrovae writes into a run folder goes through here.

A write goes to a temporary file beside the target (``.NAME.PID.tmp``), which is flushed and
fsynced, then renamed over the target (atomic on POSIX), and the folder is fsynced. A kill or a full
disk at any instant leaves either the old file or the new one, never a cut-off one. A write that
fails (no space, a file-size limit, a folder deleted underneath) raises :class:`FileWriteError`
naming the file and saying that the file as it was is intact.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pyrovae.errors import ConfigError, FileWriteError, RunFolderLostError


def previous_path(path: str | Path) -> Path:
    """Where the copy of ``path`` before its last write is kept: ``latest.pt`` -> ``latest.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_directory(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def keep_copy(path: Path, copy: Path) -> None:
    """Make ``copy`` hold what ``path`` holds now, atomically, leaving ``path`` in place: a hard
    link (no bytes copied), or a real copy where the file system has no hard links."""
    staged = temporary_path(copy)
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:
        shutil.copyfile(path, staged)
    os.replace(staged, copy)


def _failed(path: Path, error: BaseException, keep_previous: bool) -> FileWriteError:
    reason = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    if not path.parent.exists():
        return FileWriteError(f"cannot write {path}: its folder {path.parent} is gone ({reason})")
    kept = f"{path.name} as it was is intact" if path.exists() else f"nothing was written to {path.name}"
    if keep_previous and previous_path(path).exists():
        kept += f", and so is {previous_path(path).name}"
    return FileWriteError(f"cannot write {path} ({reason}; is the disk full?); {kept}")


def replace_atomically(path: str | Path, write: Callable, keep_previous: bool = False, make_folder: bool = True) -> None:
    """Write ``path`` by ``write(binary handle)`` to a temporary file that is then renamed over it.
    ``keep_previous`` keeps the file it replaces as :func:`previous_path`. ``make_folder`` creates
    ``path``'s folder (not its parents: a run folder that is gone is not recreated)."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        if make_folder and path.parent.parent.exists():
            path.parent.mkdir(exist_ok=True)
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            keep_copy(path, previous_path(path))
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except (OSError, RuntimeError) as error:  # torch.save reports a short write as a RuntimeError
        raise _failed(path, error, keep_previous) from None
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace the text file ``path`` whole (UTF-8), or leave it as it was."""
    replace_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


@contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name (``figure.savefig(temporary)``), renamed
    over ``path`` when the body ends without an error."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        raise _failed(path, error, False) from None
    finally:
        if temporary.exists():
            temporary.unlink()


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files left by a process killed mid-write (the targets are intact)."""
    directory = Path(directory)
    stale = sorted(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def folder_identity(folder: str | Path) -> tuple[int, int]:
    """(device, inode) of a folder: another folder made at the same path has another identity."""
    status = os.stat(folder)
    return status.st_dev, status.st_ino


def check_same_folder(folder: str | Path, identity: tuple[int, int] | None) -> None:
    """Raise :class:`RunFolderLostError` when ``folder`` is gone, or is no longer the folder whose
    ``identity`` was taken (deleted, and perhaps made anew by another run)."""
    if identity is None:
        return
    try:
        same = folder_identity(folder) == identity
    except FileNotFoundError:
        raise RunFolderLostError(f"the run folder {folder} was deleted while this run trained in it; stopped, nothing more is written") from None
    if not same:
        raise RunFolderLostError(
            f"the run folder {folder} was deleted and made anew (by another run?) while this run trained in it; "
            "stopped without writing into it"
        )


def save_figure(figure, path: str | Path, **options) -> None:
    """``figure.savefig(path, **options)`` (a matplotlib figure), atomically: the picture is drawn
    into a temporary file in the format of ``path``'s suffix, then renamed over it."""
    path = Path(path)
    formats = figure.canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise ConfigError(
            f"{path}: a picture is written as {', '.join('.' + kind for kind in sorted(formats))}; "
            f"{'no suffix' if not path.suffix else repr(path.suffix)} is not one of them"
        )
    with written_atomically(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".").lower(), **options)
