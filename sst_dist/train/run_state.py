"""The trainer's persistence: its run directory's outputs, what a checkpoint holds, saving and resuming.

Split from :mod:`.trainer` along the seam between the training loop and its persistence. A
resume restores the engine (weights, optimizer moments, LR scheduler), SST state, counters, RNG
and loader position; it keeps ``best`` from regressing (the mAP ``best`` points at counts even
when an older checkpoint is resumed) and refuses to continue from an explicit checkpoint older
than others of the same run, which the continued run would overwrite, unless ``--overwrite``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from sst_dist.config import save_config
from sst_dist.train import distributed as D
from sst_dist.train import rundir
from sst_dist.train.checkpoint import CheckpointError
from sst_dist.train.engine_setup import save_deepspeed_config
from sst_dist.train.logging_utils import MetricsWriter
from sst_dist.train.rundir import RunDirError

log = logging.getLogger("sst_dist")


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    pick = next((x for x in lines if "size mismatch" in x or "Missing key" in x), lines[0] if lines else "")
    return pick[:300] or type(e).__name__


class CheckpointingMixin:
    """The run directory's outputs and ``state_dict``/``save``/``resume`` of
    :class:`sst_dist.train.trainer.Trainer`."""

    # provided by the Trainer
    cfg: Any
    rank: int
    engine: Any
    sst: Any
    data: Any
    checkpoints: Any
    epoch: int
    epoch_sums: Any
    device: Any
    global_step: int
    skipped_steps: int
    best_map: float
    overwrite: bool
    trust_checkpoint: bool
    resumed_from: Path | None
    run_dir: Path
    lock: Any
    finished: bool
    ds_config: dict[str, Any]

    def _open_outputs(self) -> None:
        """Training really starts: clear replaced outputs, write config.yaml, open the metrics.

        Nothing here runs for a finished run, so resuming one only reports it."""
        keep_upto = self.global_step if self.resumed_from is not None else -1
        if self.rank == 0 and not self.finished:
            if self.overwrite:  # a fresh start, or a resume from a checkpoint older than others
                here = self.resumed_from is not None
                here = here and self.resumed_from.parent.resolve() == self.checkpoints.root.resolve()
                keep = tuple(
                    c.name for c in self.checkpoints.complete() if here and c.name <= self.resumed_from.name
                )
                removed = rundir.clear_outputs(self.run_dir, keep_checkpoints=keep, checkpoints_only=here)
                if removed:
                    log.warning("--overwrite: removed %s from %s", ", ".join(removed), self.run_dir)
            save_config(self.cfg, self.run_dir / "config.yaml")  # atomic: replaces a planted link
            save_deepspeed_config(self.ds_config, self.run_dir)
        D.barrier()
        self.metrics = MetricsWriter(
            self.run_dir, self.cfg.output.tensorboard, None if self.finished else keep_upto
        )

    def release(self) -> None:
        """Give the run directory's lock back (done by ``train``; also when the process ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def state_dict(self) -> dict[str, Any]:
        """SST state and counters (the engine checkpoints weights/optimizer/scheduler itself)."""
        return {
            "sst": self.sst.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "best_map": self.best_map,
            "epoch_sums": self.epoch_sums.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sst.load_state_dict(state["sst"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.skipped_steps, self.best_map = int(state["skipped_steps"]), float(state["best_map"])
        if "epoch_sums" in state:  # checkpoints before 2026-12-03 lack them: the epoch mean then
            self.epoch_sums.load_state_dict(state["epoch_sums"], self.device)  # covers resumed steps

    def save(self, mAP: float | None = None, mid_epoch: bool = False) -> Path:
        """Checkpoint now (collective); ``mAP`` of this epoch's evaluation moves ``best`` if higher."""
        rank_state = {}
        if hasattr(self.data.train_loader, "state_dict"):
            rank_state["loader"] = self.data.train_loader.state_dict()
        extra = {"mAP": mAP, "class_names": self.data.class_names}
        improved = mAP is not None and mAP >= self.best_map
        if mAP is not None:  # before the state is saved: a resume from here must know this mAP
            self.best_map = max(self.best_map, mAP)
        path = self.checkpoints.save(
            self.engine,
            self.epoch,
            self.global_step,
            self.state_dict(),
            rank_state,
            extra,
            mid_epoch,
            config=self.cfg,
        )
        if improved and self.rank == 0:
            self.checkpoints.mark_best(path.name)
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the run's latest good checkpoint, or ``path`` (a checkpoint or run directory).

        Returns False when the run has no checkpoint yet (a fresh start); raises
        :class:`CheckpointError` when ``path`` or every checkpoint of the run is unusable."""
        try:
            loaded = self.checkpoints.load(self.engine, path, trust=self.trust_checkpoint)
        except RuntimeError as e:  # the engine's load_state_dict: another model or optimizer
            raise CheckpointError(
                f"the checkpoint does not fit this run's model/optimizer ({_first_line(e)}); "
                "resume with the config it was trained with (its config.yaml)"
            ) from None
        if loaded is None:
            log.warning("--resume: no checkpoint in %s yet; starting from scratch", self.checkpoints.root)
            return False
        where, meta, sst, rank_state = loaded
        if path is not None:
            self._refuse_overwriting_newer(where)
        self.load_state_dict(sst)
        recorded = self.checkpoints.best_map() if self.rank == 0 else None
        recorded = D.broadcast_object(recorded)
        if recorded is not None and recorded > self.best_map:
            self.best_map = float(recorded)  # `best` never regresses to a worse checkpoint
        if math.isnan(self.best_map):
            self.best_map = -math.inf
        if rank_state.get("loader") is not None and hasattr(self.data.train_loader, "load_state_dict"):
            try:
                self.data.train_loader.load_state_dict(rank_state["loader"])
            except ValueError as e:  # another batch size, world size or data set than the checkpoint's
                raise CheckpointError(f"{where}: {e}") from None
        self.resumed_from = where
        log.info("resumed from %s (epoch %d, step %d)", where, self.epoch, self.global_step)
        return True

    def _refuse_overwriting_newer(self, where: Path) -> None:
        """An explicit older checkpoint: the continued run would overwrite this run's newer ones."""
        newer: object = []
        if self.rank == 0:
            own = where.parent.resolve() == self.checkpoints.root.resolve()
            newer = [c.name for c in self.checkpoints.complete() if not own or c.name > where.name]
        names: list[str] = D.broadcast_object(newer)  # type: ignore[assignment]
        if names and not self.overwrite:
            raise RunDirError(
                f"resuming from {where} would overwrite checkpoints {', '.join(names[-3:])} of "
                f"{self.checkpoints.root.parent}; pass --overwrite to replace them (or --resume the latest)"
            )
