"""Atomic, resumable checkpoints: DeepSpeed engine state plus everything SST needs to continue.

Layout under ``{run_dir}/checkpoints``::

    epoch_0003/engine/...        engine.save_checkpoint (weights, optimizer, scheduler, ZeRO shards)
    epoch_0003/sst_state.pt      bank, margins, synchronized generator, counters (rank 0 writes)
    epoch_0003/rank_00001.pt     per-rank RNG states (python, numpy, torch) and loader state
    epoch_0003/meta.json         epoch, step, files; written last inside the directory
    latest                       name of the newest complete checkpoint, replaced last

Every rank writes into ``.tmp-epoch_0003``; after a barrier rank 0 writes ``meta.json``,
renames the directory, then replaces ``latest`` and prunes old ones. A crash at any point
leaves the previous checkpoint and pointer intact. Loading checks the pointed checkpoint and
falls back to the previous complete one (with a warning) when it is damaged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sst_dist.train import distributed as D

log = logging.getLogger("sst_dist.checkpoint")
PREFIX = "epoch_"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class CheckpointManager:
    """Save/load/prune checkpoints of one run (collective: call on every rank)."""

    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    @staticmethod
    def name(epoch: int, mid_epoch_step: int | None = None) -> str:
        """``epoch_0003`` after 3 finished epochs; ``epoch_0003_step_00001234`` inside the 4th.

        Names sort in training order (a name is a prefix of its mid-epoch successors)."""
        base = f"{PREFIX}{epoch:04d}"
        return base if mid_epoch_step is None else f"{base}_step_{mid_epoch_step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints (those with meta.json), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(f"{PREFIX}*") if (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def save(
        self,
        engine: Any,
        epoch: int,
        step: int,
        sst_state: dict[str, Any],
        rank_state: dict[str, Any],
        extra: dict[str, Any] | None = None,
        mid_epoch: bool = False,
    ) -> Path:
        """Write checkpoint ``epoch`` (the number of finished epochs; ``mid_epoch``: inside the next
        one, at global step ``step``) atomically."""
        name = self.name(epoch, step if mid_epoch else None)
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        if D.rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        D.barrier()
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{D.rank():05d}.pt")
        if D.rank() == 0:
            torch.save(sst_state, tmp / "sst_state.pt")
        D.barrier()
        if D.rank() == 0:
            meta = {"epoch": epoch, "step": step, "world_size": D.world_size(), **(extra or {})}
            meta["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.root / "latest.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, self.root / "latest")
            self._prune(keep_also=name)
        D.barrier()
        return final

    def _prune(self, keep_also: str) -> None:
        best = self.best()
        done = self.complete()
        for p in done[: max(0, len(done) - self.keep)]:
            if p.name not in (keep_also, best):
                shutil.rmtree(p, ignore_errors=True)

    def best(self) -> str | None:
        """Name of the best checkpoint by mAP (kept by pruning), if any."""
        f = self.root / "best"
        return f.read_text().strip() if f.is_file() else None

    def mark_best(self, name: str) -> None:
        """Point ``best`` at checkpoint ``name`` (rank 0; atomic replace)."""
        tmp = self.root / "best.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / "best")

    def _check(self, path: Path) -> dict[str, Any]:
        """meta.json of ``path`` after checking all its files exist and the small ones load."""
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} missing (incomplete checkpoint)")
        meta = json.loads(meta_file.read_text())
        missing = [f for f in meta.get("files", []) if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {path} lacks {missing[:3]}")
        torch.load(path / "sst_state.pt", map_location="cpu", weights_only=False)
        return meta

    def candidates(self, explicit: str | Path | None = None) -> list[Path]:
        """Directories to try, best first: ``explicit`` or the pointer target, then older ones."""
        if explicit is not None:
            p = Path(explicit)
            if (p / "meta.json").is_file() or not (p / "checkpoints").is_dir():
                return [p]
            return CheckpointManager(p, self.keep).candidates()
        order = list(reversed(self.complete()))
        pointer = self.root / "latest"
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            order = [target] + [p for p in order if p != target]
        return order

    def load(self, engine: Any, explicit: str | Path | None = None) -> tuple[Path, dict, dict, dict] | None:
        """Load the newest usable checkpoint into ``engine``; returns (dir, meta, sst, rank) or None.

        Every rank walks the same candidate list; a damaged one is skipped with a warning on
        every rank (the decision is taken on rank 0 and broadcast, so ranks never diverge).
        """
        for path in self.candidates(explicit):
            ok: object = True
            if D.rank() == 0:
                try:
                    self._check(path)
                except Exception as e:  # damaged or partial checkpoint
                    ok = f"{type(e).__name__}: {e}"
            ok = D.broadcast_object(ok)
            if ok is not True:
                log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, ok)
                continue
            meta = json.loads((path / "meta.json").read_text())
            load_path, _ = engine.load_checkpoint(
                str(path), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                log.warning("DeepSpeed could not load %s/engine; falling back", path)
                continue
            sst = torch.load(path / "sst_state.pt", map_location="cpu", weights_only=False)
            rank_file = path / f"rank_{D.rank():05d}.pt"
            rank_state = (
                torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.is_file() else {}
            )
            if meta.get("world_size") != D.world_size():
                log.warning(
                    "checkpoint %s was written by %s ranks, now %s: RNG/loader state not restored",
                    path,
                    meta.get("world_size"),
                    D.world_size(),
                )
                rank_state = {}
            elif "rng" in rank_state:
                set_rng_state(rank_state["rng"])
            return path, meta, sst, rank_state
        return None
