"""Resume and checkpoints: what a run writes after each epoch, and how a resumed run takes it back.

A checkpoint holds the model's, the guide's and the optimizer's state, the
:class:`~pyrovae.train.state.TrainState` (epoch, step, best score, early stop, recoveries, the
metrics history), the random states, the ``fingerprint`` (e.g. the resolved config) and the world
size. ``checkpoints/latest.pt`` is written after every epoch, ``checkpoints/best.pt`` after the best
ones, atomically (:mod:`pyrovae.train.checkpoint`). A resumed run restores all of it and continues
as if never stopped.

Random streams per rank: rank 0 keeps the stream a single process would have; the others are
seeded from rank 0's seed and their rank. Checkpoints carry every rank's random state
(``rng_ranks``; ``rng`` stays rank 0's, so a single process can resume any checkpoint). At the same
world size a resume is exact; at another, rank 0 takes rank 0's stream, the others are seeded from
it, and a message says that the draws differ from then on. Rank 0 reads the checkpoint and sends it
to the others (no shared file system needed).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from pyrovae.traces import preserved_rng
from pyrovae.train import distributed
from pyrovae.errors import CheckpointError
from pyrovae.files import check_same_folder, folder_identity
from pyrovae.train.checkpoint import (
    BEST,
    LATEST,
    PARTS,
    check_contents,
    load_checkpoint_or_previous,
    load_into,
    previous_path,
    remove_stale_temporaries,
    save_checkpoint,
)
from pyrovae.train.progress import say
from pyrovae.train.recovery import copied_state_dict
from pyrovae.train.state import TrainState


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_other_ranks(context) -> None:
    """A fresh distributed run: rank 0 keeps its random stream (the one a single process would
    use); every other rank gets its own, seeded from rank 0's seed and the rank."""
    if not context.active:
        return
    base = distributed.broadcast_object(context, torch.initial_seed(), "sharing the seed")
    if not context.is_main:
        torch.manual_seed(distributed.mixed_seed(base, context.rank))


def restore_rng(saved: dict, context, say) -> None:
    """Each rank's random stream from a checkpoint. At the world size it was written with, every
    rank gets its own saved stream back (an exact resume); at another, rank 0 (or the single
    process) takes rank 0's stream and the other ranks are seeded from it."""
    saved_world = int(saved.get("world_size", 1))
    ranks = saved.get("rng_ranks") or [saved["rng"]]
    if saved_world != context.world_size:
        say(
            f"resuming a run written by {saved_world} process(es) with {context.world_size}: parameters, optimizer "
            f"state, step, schedules and early stopping continue exactly, and the global batch (train.batch_size) "
            f"is unchanged, but the data order and random draws from here on differ from an unbroken run"
        )
    if context.active and len(ranks) == context.world_size and saved_world == context.world_size:
        set_rng_state(ranks[context.rank])
        return
    set_rng_state(ranks[0])
    if context.active:
        with preserved_rng():
            base = int(torch.randint(0, 2**62, (1,)))
        if not context.is_main:
            torch.manual_seed(distributed.mixed_seed(base, context.rank))


def restored_state(saved_state: dict, patience: int) -> TrainState:
    """The :class:`TrainState` of a checkpoint, also of one written by an earlier version."""
    saved_state = dict(saved_state)
    if "best_valid_elbo" in saved_state:  # checkpoints written before selection by the objective's bound
        saved_state["best_valid_score"] = saved_state.pop("best_valid_elbo")
    state = TrainState(**saved_state)
    # Checkpoints written before the early stop was part of the state.
    state.stopped_early = state.stopped_early or bool(patience and state.epochs_without_improvement >= patience)
    return state


class Checkpoints:
    """``run_dir/checkpoints`` of ``training`` (nothing is written without ``run_dir``): :meth:`start`
    or :meth:`resume` before the first epoch, :meth:`save` after each."""

    def __init__(self, training, run_dir: str | Path | None = None, fingerprint: dict | None = None, run_files: dict | None = None):
        self.training, self.fingerprint, self.run_files = training, fingerprint, dict(run_files or {})
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.folder = self.run_dir / "checkpoints" if run_dir is not None else None
        # The folder this run writes into: a folder deleted, or replaced by another run's, stops it.
        self.identity = folder_identity(self.run_dir) if self.run_dir is not None and self.run_dir.is_dir() else None

    def start(self) -> None:
        """A fresh run: every rank its own random stream."""
        seed_other_ranks(self.training.context)

    def resume(self) -> None:
        """Restore the parameters, the optimizer's state, ``training.state`` and the random state
        from ``latest.pt`` (or its previous copy, if it is damaged)."""
        run = self.training
        saved = distributed.on_main(run.context, self._load, "loading the checkpoint")
        where = self.folder / LATEST if self.folder is not None else LATEST
        check_contents(saved, where, needs=(*PARTS, "optimizer"))
        load_into(run.model, saved["model"], where, "model")
        load_into(run.guide, saved["guide"], where, "guide")
        try:
            run.optimizer.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{where}: its optimizer state does not fit this model and guide ({error})") from None
        run.state = restored_state(saved["state"], run.config.patience)
        restore_rng(saved, run.context, run.say)
        if run.state.stopped_early:
            decays, limit = run.state.lr_plateau_decays, run.config.lr_plateau_max_decays
            why = f"lr decay {decays} of train.lr_plateau_max_decays = {limit}" if limit and decays >= limit else f"patience {run.config.patience}"
            run.say(f"the run stopped early at epoch {run.state.epoch} ({why}); nothing left to train")

    def _load(self) -> dict:
        folder = self.folder
        if folder is None or not any((folder / name).exists() for name in (LATEST, previous_path(LATEST))):
            raise FileNotFoundError(f"--resume: no checkpoint at {folder / LATEST if folder else '(no run dir)'}")
        remove_stale_temporaries(folder)
        remove_stale_temporaries(self.run_dir)
        device = "cpu" if self.training.context.active else self.training.device
        return load_checkpoint_or_previous(folder / LATEST, device, warn=say)

    def contents(self) -> dict:
        """What a checkpoint holds now. Under ``torchrun`` every rank must call it (it gathers
        every rank's random state, so a resume at this world size is exact)."""
        run = self.training
        saved = {
            "model": run.model.state_dict(),
            "guide": run.guide.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "state": asdict(run.state),
            "rng": rng_state(),
            "fingerprint": self.fingerprint,
            "run_files": self.run_files,
            "world_size": run.context.world_size,
        }
        if run.context.active:
            saved["rng_ranks"] = distributed.gather_objects(run.context, saved["rng"], "gathering random states")
        return saved

    def save(self, improved: bool) -> None:
        """``latest.pt``, and ``best.pt`` when the epoch is the best so far (rank 0 writes)."""
        context = self.training.context
        # Every rank takes part in gathering the random states, whether or not it was given run_dir.
        if self.folder is None and not context.active:
            return
        saved = self.contents()
        if self.folder is not None and context.is_main:
            check_same_folder(self.run_dir, self.identity)
            if improved:
                save_checkpoint(saved, self.folder / BEST)
            save_checkpoint(saved, self.folder / LATEST)


class ReloadBest:
    """He et al. 2019's reload at each plateau decay (``train.lr_plateau_reload_best``): a copy of
    the parameters and buffers of the best epoch so far, taken when an epoch is the best; when an
    epoch's end decays the learning rates, the model and guide go back to it and the optimizer's
    state is cleared (He et al. build new optimizers). After a resume the copy comes from
    ``best.pt`` (rank 0 reads it and sends it to the others). Call :meth:`after_epoch` before the
    epoch's checkpoint is written, so ``latest.pt`` holds what the next epoch starts from."""

    def __init__(self, training, checkpoints: Checkpoints):
        self.training, self.checkpoints = training, checkpoints
        self.enabled = bool(training.config.lr_plateau_reload_best)
        self.best: dict | None = None
        self.message: str | None = None

    def after_epoch(self, improved: bool, decayed: bool) -> None:
        run = self.training
        if not self.enabled:
            return
        if improved:
            self.best = {part: copied_state_dict(getattr(run, part).state_dict()) for part in ("model", "guide")}
        elif decayed:
            if self.best is None:
                self.best = distributed.on_main(run.context, self._read_best, "reading best.pt")
            run.model.load_state_dict(self.best["model"])
            run.guide.load_state_dict(self.best["guide"])
            run.optimizer.state.clear()
            best = run.state.best_epoch
            self.message = (
                f"the run ends on the parameters of the best epoch, {best}"
                if run.state.stopped_early
                else f"continuing from the parameters of the best epoch, {best}, with a fresh optimizer state"
            )

    def announce(self) -> None:
        if self.message is not None:
            self.training.say(self.message)
            self.message = None

    def _read_best(self) -> dict:
        folder = self.checkpoints.folder
        if folder is None:
            raise CheckpointError("train.lr_plateau_reload_best: no best parameters to reload (no run folder after a resume)")
        saved = load_checkpoint_or_previous(folder / BEST, "cpu", warn=say)
        check_contents(saved, folder / BEST, needs=("model", "guide"))
        return {part: saved[part] for part in ("model", "guide")}
