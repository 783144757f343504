"""Atomic, resumable checkpoints: DeepSpeed engine state plus everything SST needs to continue.

Layout under ``{run_dir}/checkpoints``::

    epoch_0003/engine/...        engine.save_checkpoint (weights, optimizer, scheduler, ZeRO shards)
    epoch_0003/sst_state.pt      bank, margins, synchronized generator, counters (rank 0 writes)
    epoch_0003/rank_00001.pt     per-rank RNG states (python, numpy, torch) and loader state
    epoch_0003/config.yaml       the resolved run config (eval/predict rebuild the model from it)
    epoch_0003/meta.json         epoch, step, files and their sizes; written last inside the directory
    latest                       name of the newest complete checkpoint, replaced last
    best                         name of the best checkpoint by mAP

Every rank writes into ``.tmp-epoch_0003``; after a barrier rank 0 writes ``meta.json``,
renames the directory, then replaces ``latest`` and prunes old ones. A crash at any point
leaves the previous checkpoint and pointer intact. Loading checks every file of the pointed
checkpoint first (:mod:`.ckpt_files`), names a damaged one and falls back to the previous complete
checkpoint. Every file is stored as tensors and plain containers, so it loads with
``weights_only=True``; pointer files may name only a checkpoint directory of their own run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_shards.safe_io import atomic_write_text, ensure_own_dir
from sst_dist.safe_load import UnsafeCheckpointError, load_tensors
from sst_dist.train import distributed as D
from sst_dist.train.ckpt_files import DamagedCheckpoint, safe_engine_loads, verify_checkpoint

log = logging.getLogger("sst_dist.checkpoint")
PREFIX = "epoch_"
NAME_RE = re.compile(r"epoch_\d{4}(_step_\d{8})?")


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for; the message names the path and why."""


def read_pointer(checkpoints_root: Path, name: str) -> Path | None:
    """The checkpoint directory that pointer file ``name`` (``latest``/``best``) names, or None
    when there is no such pointer.

    Only a plain checkpoint name (``epoch_NNNN`` or ``epoch_NNNN_step_SSSSSSSS``) of a real
    directory directly inside ``checkpoints_root`` is accepted: no paths, no links leaving the
    run. Anything else raises ``ValueError`` naming the pointer file.
    """
    root = Path(checkpoints_root)
    f = root / name
    if not os.path.lexists(f):
        return None
    if f.is_symlink() or not f.is_file():
        raise ValueError(f"pointer file {f} is a link or not a regular file; refusing to follow it")
    with f.open("rb") as fh:
        text = fh.read(256).decode("utf-8", errors="replace").strip()
    if not NAME_RE.fullmatch(text):
        raise ValueError(
            f"pointer file {f} holds {text[:80]!r}, not a checkpoint name "
            "(epoch_NNNN or epoch_NNNN_step_SSSSSSSS)"
        )
    target = root / text
    if target.is_symlink() or not target.is_dir():
        raise ValueError(f"pointer file {f} names {text}, which is not a checkpoint directory in {root}")
    return target


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (and this device's CUDA) RNG states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    p, n = state["python"], state["numpy"]
    random.setstate((int(p["version"]), tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
        """Complete checkpoints (real directories with meta.json), oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if NAME_RE.fullmatch(p.name) and not p.is_symlink() and (p / "meta.json").is_file()
        ]
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
        config: Any = None,
    ) -> Path:
        """Write checkpoint ``epoch`` (the number of finished epochs; ``mid_epoch``: inside the next
        one, at global step ``step``) atomically, with the resolved run ``config`` (a RunConfig)."""
        name = self.name(epoch, step if mid_epoch else None)
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        if D.rank() == 0:
            ensure_own_dir(self.root)
            if tmp.is_symlink():
                tmp.unlink()
            elif tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            if config is not None:
                from sst_dist.config import save_config

                save_config(config, tmp / "config.yaml")  # a fresh directory: nothing planted there
        D.barrier()
        engine.save_checkpoint(str(tmp), tag="engine", save_latest=False)
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{D.rank():05d}.pt")
        if D.rank() == 0:
            torch.save(sst_state, tmp / "sst_state.pt")
        D.barrier()
        if D.rank() == 0:
            meta = {"epoch": epoch, "step": step, "world_size": D.world_size(), **(extra or {})}
            files = sorted(p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
            meta["files"] = [str(p.relative_to(tmp)) for p in files]
            meta["sizes"] = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
            if final.is_symlink():
                final.unlink()
            elif final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", name + "\n")
            self._prune(keep_also=name)
        D.barrier()
        return final

    def _prune(self, keep_also: str) -> None:
        best = self.best()
        done = self.complete()
        for p in done[: max(0, len(done) - self.keep)]:
            if p.name not in (keep_also, best):
                shutil.rmtree(p, ignore_errors=True)

    def _pointer(self, name: str) -> Path | None:
        """:func:`read_pointer`, with a warning instead of an error for a bad pointer."""
        try:
            return read_pointer(self.root, name)
        except ValueError as e:
            log.warning("%s; ignoring it", e)
            return None

    def best(self) -> str | None:
        """Name of the best checkpoint by mAP (kept by pruning), if any."""
        p = self._pointer("best")
        return None if p is None else p.name

    def best_map(self) -> float | None:
        """The mAP recorded in the meta.json of the checkpoint ``best`` names, if readable."""
        p = self._pointer("best")
        try:
            value = json.loads((p / "meta.json").read_text()).get("mAP") if p is not None else None
            return None if value is None else float(value)
        except (OSError, ValueError, TypeError):
            return None

    def mark_best(self, name: str) -> None:
        """Point ``best`` at checkpoint ``name`` (rank 0; atomic replace)."""
        atomic_write_text(self.root / "best", name + "\n")

    def candidates(self, explicit: str | Path | None = None) -> list[Path]:
        """Directories to try, best first: ``explicit`` or the pointer target, then older ones."""
        if explicit is not None:
            p = Path(explicit).expanduser().resolve()  # links the user typed are the user's choice
            if (p / "meta.json").is_file():
                return [p]
            if (p / "checkpoints").is_dir():
                return CheckpointManager(p, self.keep).candidates()
            if not p.exists():
                raise CheckpointError(f"{p} does not exist (give a checkpoint directory or a run directory)")
            raise CheckpointError(f"{p} is neither a checkpoint directory (no meta.json) nor a run directory")
        order = list(reversed(self.complete()))
        target = self._pointer("latest")
        if target is not None and order and order[0].name > target.name:
            # a crash between the rename and the pointer update: the newer checkpoint is complete,
            # and a run continued from the older one would overwrite it
            log.warning(
                "latest names %s but %s is newer and complete; trying it first", target.name, order[0]
            )
        elif target is not None:
            order = [target] + [p for p in order if p != target]
        return order

    def load(
        self, engine: Any, explicit: str | Path | None = None, trust: bool = False
    ) -> tuple[Path, dict, dict, dict] | None:
        """Load the newest usable checkpoint into ``engine``; returns (dir, meta, sst, rank), or
        None when there is no checkpoint at all (and no ``explicit`` path was given).

        Rank 0 checks every file of each candidate (:func:`verify_checkpoint`) and broadcasts the
        verdict, so all ranks skip the same damaged ones (each named in a warning) before any
        collective load starts. Raises :class:`CheckpointError` when candidates exist but none is
        usable, or ``explicit`` is not a usable checkpoint, and ``UnsafeCheckpointError`` for a
        file that needs pickle (unless ``trust``).
        """
        candidates = self.candidates(explicit)
        damaged: list[str] = []
        for path in candidates:
            verdict: object = True
            if D.rank() == 0:
                try:
                    verify_checkpoint(path, trust)
                except UnsafeCheckpointError as e:
                    verdict = ("unsafe", str(e))
                except (DamagedCheckpoint, OSError) as e:
                    verdict = ("damaged", str(e))
            verdict = D.broadcast_object(verdict)
            if verdict is not True:
                kind, why = verdict  # type: ignore[misc]
                if kind == "unsafe":
                    raise UnsafeCheckpointError(why)
                damaged.append(why)
                more = "trying the previous one" if path != candidates[-1] else "no older checkpoint to try"
                log.warning("checkpoint %s is damaged: %s; %s", path, why, more)
                continue
            meta = json.loads((path / "meta.json").read_text())
            with safe_engine_loads(engine, trust):
                load_path, _ = engine.load_checkpoint(
                    str(path), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
                )
            if load_path is None:
                damaged.append(f"DeepSpeed could not load {path}/engine")
                more = "trying the previous one" if path != candidates[-1] else "no older checkpoint to try"
                log.warning("DeepSpeed could not load %s/engine; %s", path, more)
                continue
            sst = load_tensors(path / "sst_state.pt", trust=trust)
            rank_file = path / f"rank_{D.rank():05d}.pt"
            rank_state = load_tensors(rank_file, trust=trust) if rank_file.is_file() else {}
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
        if explicit is not None:
            why = damaged[-1] if damaged else "no complete checkpoint in it"
            raise CheckpointError(f"{explicit} is not a usable checkpoint: {why}")
        if damaged:
            raise CheckpointError(f"no usable checkpoint in {self.root}: {'; '.join(damaged)}")
        return None
