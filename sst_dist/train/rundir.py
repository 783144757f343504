"""A training run's directory: whose it is, who is using it, and what a new run may do to it.

Why: a fresh run into a directory with checkpoints used to overwrite them and append to their
metrics, and two runs with the same name wrote into each other. Rank 0 now

- refuses a directory (or a link in its place) that is not the user's own,
- takes ``.lock`` (an ``flock`` the kernel drops when the process dies, so a crashed run never
  blocks the next; where the file system has no ``flock`` the lock's pid is checked instead),
- refuses a fresh run into a directory with checkpoints unless told ``--overwrite``,
- clears the old outputs (the trainer then writes ``config.yaml``) only once training really starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from data_shards.file_lock import ExclusiveLock, describe
from data_shards.safe_io import ensure_own_dir

LOCK_NAME = ".lock"
# what a run writes into its directory; --overwrite removes exactly these
OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "eval", "config.yaml")
# what says a run started here (written when training starts): a fresh run must not replace them
EARLIER_RUN = ("config.yaml", "metrics.jsonl")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says why and what to do."""


def checkpoint_names(run_dir: Path) -> list[str]:
    """Names of the checkpoint directories (complete or not) under ``run_dir/checkpoints``."""
    from sst_dist.train.checkpoint import NAME_RE

    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if NAME_RE.fullmatch(p.name))


class RunLock(ExclusiveLock):
    """Exclusive use of one run directory by one run (held by rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(Path(run_dir) / LOCK_NAME, self._refuse)

    def _refuse(self, holder: dict[str, Any]) -> RunDirError:
        return RunDirError(
            f"{self.path.parent} is in use by another run ({describe(holder)}); wait for it, pick "
            f"another output.name, or delete {self.path} if no such run is alive"
        )

def claim(run_dir: Path, resuming: bool, overwrite: bool) -> RunLock:
    """Rank 0 before a run starts: check ownership, take the lock, apply the overwrite policy.

    A fresh run (not ``resuming``) into a directory that holds checkpoints, or the config and
    metrics of a run stopped before its first checkpoint, is refused unless ``overwrite``;
    nothing is deleted here (that waits for :func:`clear_outputs`).
    """
    run_dir = Path(run_dir)
    ensure_own_dir(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    names = checkpoint_names(run_dir)
    if not resuming and not overwrite and names:
        lock.release()
        shown = ", ".join(names[-3:])
        raise RunDirError(
            f"{run_dir} already holds checkpoints ({shown}); continue that run with --resume, "
            "or pass --overwrite to delete its outputs and start over"
        )
    earlier = [n for n in EARLIER_RUN if os.path.lexists(run_dir / n)]
    if not resuming and not overwrite and earlier:  # a run stopped before its first checkpoint
        lock.release()
        raise RunDirError(
            f"{run_dir} already holds an earlier run's {', '.join(earlier)} (no checkpoint yet); "
            "restart that run with --resume, or pass --overwrite to delete its outputs and start over"
        )
    return lock


def clear_outputs(
    run_dir: Path, keep_checkpoints: tuple[str, ...] = (), checkpoints_only: bool = False
) -> list[str]:
    """Remove the outputs of a previous run (``--overwrite``), but not the listed checkpoints;
    ``checkpoints_only`` (a resume within the run) keeps its metrics, which the metrics writer
    cuts back to the resumed step. Links are removed, never followed. Returns what was removed."""
    run_dir = Path(run_dir)
    removed: list[str] = []
    for name in ("checkpoints",) if checkpoints_only else OUTPUTS:
        p = run_dir / name
        if name == "checkpoints" and p.is_dir() and not p.is_symlink():
            for child in sorted(p.iterdir()):
                if child.name in keep_checkpoints or _points_to_kept(p, child.name, keep_checkpoints):
                    continue
                _remove(child)
                removed.append(f"checkpoints/{child.name}")
        elif os.path.lexists(p):
            _remove(p)
            removed.append(name)
    return removed


def _points_to_kept(root: Path, name: str, keep: tuple[str, ...]) -> bool:
    """Whether ``name`` is a pointer file (latest/best) naming a checkpoint that stays."""
    from sst_dist.train.checkpoint import read_pointer

    if name not in ("latest", "best") or not keep:
        return False
    try:
        target = read_pointer(root, name)
    except ValueError:
        return False
    return target is not None and target.name in keep


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink()
    else:
        shutil.rmtree(p)
