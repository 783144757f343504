"""The trainer's data side: synthetic data on demand, loaders, and the adjacency from partial labels.

The co-occurrence adjacency must come from the PARTIAL training labels of the run's proportion
(DESIGN §2.3), which the train loader already derives by the protocol; reusing them keeps the
graph and the supervision consistent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sst_dist.config import ConfigError, RunConfig
from sst_dist.train import distributed as D

log = logging.getLogger("sst_dist")


class DataError(ValueError):
    """The run's data cannot be used as configured: missing or damaged shards, a class count or
    class list that disagrees. A user's input problem: one line and exit status 2."""


def check_class_names(expected: list[str], got: list[str], what: str, against: str) -> None:
    """Raise :class:`DataError` unless ``got`` (the classes of ``what``) equals ``expected``
    (those of ``against``) in the same order: a permutation would score every class as another."""
    if list(got) == list(expected):
        return
    diff = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    have = lambda names: repr(names[diff]) if diff < len(names) else "nothing"  # noqa: E731
    raise DataError(
        f"{what} has other classes than {against}: {len(got)} vs {len(expected)}, first difference at "
        f"index {diff} ({have(got)} vs {have(expected)}); convert both with the same class list"
    )


@dataclass
class RunData:
    """What the trainer needs from the data side (built by :func:`build_data`)."""

    train_loader: Any
    test_loader: Any
    adjacency: torch.Tensor
    class_names: list[str]


def ensure_synthetic(cfg: RunConfig) -> None:
    """Rank 0 generates and converts the synthetic scenes when ``data.synthetic.enabled`` and absent.

    Existing shards are reused only if their recorded generation parameters (``synthetic.json``)
    match the config; otherwise a one-line ConfigError names the file and the differing key. New
    scenes go only into an absent or empty ``data.root`` (a DataError otherwise: nothing there is
    replaced). A failure on rank 0 is broadcast, so every rank raises it instead of waiting for rank 0.
    """
    s, root = cfg.data.synthetic, Path(cfg.data.root)
    if not s.enabled:
        return
    problem = None
    if D.rank() == 0:
        try:
            _prepare_synthetic(cfg, s, root)
        except Exception as e:  # every rank must hear of it, or the others wait for rank 0 forever
            problem = ("config" if isinstance(e, ConfigError) else "data", str(e))
            D.broadcast_object(problem)
            raise
    problem = D.broadcast_object(problem)
    if problem is not None:
        kind, why = problem
        raise (ConfigError if kind == "config" else DataError)(f"rank 0 could not prepare the data: {why}")


def interrupted_leftovers(root: Path) -> list[Path]:
    """The hidden ``.*.tmp`` files and folders a generation killed outright (SIGKILL, or a
    SIGTERM from ``timeout`` or SLURM) leaves in ``root``, and the shard writer's split locks:
    they do not make it a used folder."""
    from data_shards.writer import LOCK_SUFFIX, TMP_SUFFIX

    if not root.is_dir() or root.is_symlink():
        return []
    machinery = (TMP_SUFFIX, LOCK_SUFFIX)
    return sorted(p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith(machinery))


def _what_root_holds(root: Path, have: list[str], splits: tuple[str, str], leftovers: list[Path]) -> str:
    """Why synthetic data may not be generated into ``root`` (words after "data.root=ROOT"), or ""
    for an absent root or one holding nothing but ``leftovers``."""
    if not (root.exists() or root.is_symlink()):
        return ""
    if not root.is_dir():
        return "is not a directory"
    if have:
        missing = next(x for x in splits if x not in have)
        return f"holds the {have[0]!r} split but no {missing!r} split"
    if any(p not in leftovers for p in root.iterdir()):
        return "is not empty but holds no synthetic train and test splits"
    return ""


def _prepare_synthetic(cfg: RunConfig, s: Any, root: Path) -> None:
    """Rank 0's part of :func:`ensure_synthetic`: check the scenes, or generate and convert them.

    Both splits there: their record must match the config (ConfigError). Otherwise scenes are
    generated only into an absent or empty ``data.root``; anything else there (a lone split, raw
    scenes, a user's files) is refused with a DataError naming the folder, and left as it was.
    """
    from data_shards import format as fmt
    from data_shards import synthetic as synth
    from data_shards.safe_io import UnsafePathError
    from data_shards.synthetic_build import build_synthetic

    params = synth.generation_params(s.num_train, s.num_test, s.num_classes, s.image_size, s.seed,
                                     min(4, s.num_classes), s.difficulty)
    splits = (cfg.data.train_split, cfg.data.test_split)
    have = [split for split in splits if list(root.glob(f"*-{split}-_info.json"))]
    if len(have) == len(splits):
        try:
            synth.check_params(root, params)
        except ValueError as e:  # the config asks for other data than data.root holds
            raise ConfigError(f"data.synthetic: {e}") from None
    else:
        leftovers = interrupted_leftovers(root)
        held = _what_root_holds(root, have, splits, leftovers)
        if held:
            raise DataError(f"data.root={root} {held}; data.synthetic generates only into an empty or "
                            "absent directory and replaces nothing: point data.root at a new directory "
                            "(or, if nothing there is needed, remove it and run again)")
        if leftovers:  # kept: they are nobody's data, but a backup among them may be someone's
            log.warning("data.root=%s holds what an interrupted generation left (%s); generating "
                        "beside it (delete it once no process uses it)", root,
                        ", ".join(p.name for p in leftovers[:3]))
        log.info(
            "generating synthetic scenes (%d train, %d test, %d classes, %dpx, %s) in %s",
            s.num_train,
            s.num_test,
            s.num_classes,
            s.image_size,
            s.difficulty,
            root,
        )
        try:
            build_synthetic(root, params, name="synthetic", splits=splits, num_workers=0, progress=False)
        except (ValueError, FileExistsError, NotADirectoryError, UnsafePathError) as e:
            raise DataError(f"data.root={root}: {e}") from None
    fmt.find_info(root, cfg.data.train_split)


def build_data(cfg: RunConfig, rank: int, world_size: int, device: torch.device):  # -> RunData
    """Train/test loaders for this rank, the adjacency and the class names."""
    from data_shards.loaders import build_loader
    from sst_dist.model.adjacency import cooccurrence_adjacency
    from sst_dist.train.engine_setup import DTYPES

    ensure_synthetic(cfg)
    d = cfg.data
    common = dict(
        image_size=d.image_size,
        proportion=d.proportion,
        seed=d.seed,
        rank=rank,
        world_size=world_size,
        num_workers=d.num_workers,
        backend=d.backend,
        device=device,
        dtype=DTYPES[cfg.train.precision],  # images arrive as the step uses them: no second cast
        num_classes=cfg.model.num_classes,
    )
    try:
        train = build_loader(d.root, d.train_split, train=True, batch_size=cfg.train.batch_size, **common)
        test = build_loader(d.root, d.test_split, train=False, batch_size=cfg.train.batch_size, **common)
    except (FileNotFoundError, ValueError) as e:  # shards missing, damaged or of another shape
        raise DataError(f"data.root={d.root}: {e}") from e
    names = list(train.shards.info["classes"])
    check_class_names(names, test.shards.info["classes"], f"test split {d.test_split!r}",
                      f"train split {d.train_split!r} in data.root={d.root}")
    adjacency = cooccurrence_adjacency(train.shards.partial)
    return RunData(train, test, adjacency, names)
