"""``sst-dist eval CHECKPOINT [key.sub=value ...]``: evaluate a checkpoint on the test split.

CHECKPOINT is a checkpoint directory (``.../checkpoints/epoch_0003``), a pointer file
(``.../checkpoints/best`` or ``latest``), a run directory (its ``latest`` checkpoint is used),
or a file written by ``sst-dist convert-checkpoint`` (an official SST model; then ``--config``
names the run config that gives the data and model). A run's saved ``config.yaml`` gives the
model and data; overrides change e.g. ``data.root`` or ``data.test_split``. Runs on any number
of ranks (same launchers as training), each on its GPU when there is one; scores are gathered in
dataset order, rank 0 prints the table and writes the per-class AP JSON/PNG into ``--out``
(default: the checkpoint directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def is_pointer(path: Path) -> bool:
    """A ``checkpoints/best`` or ``checkpoints/latest`` file naming a sibling checkpoint directory."""
    if not (path.is_file() and path.name in ("best", "latest")):
        return False
    return (path.parent / path.read_text().strip()).is_dir()


def is_converted_file(path: str | Path) -> bool:
    """A single file that is not a pointer: what ``sst-dist convert-checkpoint`` writes."""
    return Path(path).is_file() and not is_pointer(Path(path))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for a checkpoint directory, pointer file or run directory."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    if is_pointer(p):
        return p.parent / p.read_text().strip()
    pointer = p / "checkpoints" / "latest"
    if pointer.is_file():
        return p / "checkpoints" / pointer.read_text().strip()
    raise FileNotFoundError(
        f"{p} is neither a checkpoint directory (with meta.json) nor a run directory "
        "(with checkpoints/latest)"
    )


def load_converted_model(
    path: str | Path, config: str | None, overrides: list[str] | None
) -> tuple[Any, Any, dict]:
    """(SSTModel with an imported official model's weights, RunConfig, meta) for evaluation."""
    from sst_dist.config import load_config
    from sst_dist.convert import load_converted_into
    from sst_dist.model.sst import SSTModel

    if not config:
        raise ValueError(f"{path} is a single file (a converted checkpoint): pass --config RUN_CONFIG")
    cfg = load_config(config, overrides)
    C = cfg.model.num_classes
    model = SSTModel(cfg.model, torch.zeros(C, C))
    info = load_converted_into(model, path)
    model.eval()
    return model, cfg, {"class_names": None, "epoch": info.get("epoch")}


def load_checkpoint_model(path: str | Path, overrides: list[str] | None = None) -> tuple[Any, Any, dict]:
    """(SSTModel in eval mode with the checkpoint's weights and bank, RunConfig, meta) on the CPU.

    Reads DeepSpeed's consolidated module state (ZeRO stages 0-2); a ZeRO-3 checkpoint, which has
    none, is consolidated from its partitions by DeepSpeed's ``zero_to_fp32``. The adjacency is a
    buffer of the saved model.
    """
    from sst_dist.config import load_config
    from sst_dist.model.sst import SSTModel

    ckpt = resolve_checkpoint(path)
    run_dir = ckpt.parent.parent
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"run config {cfg_file} (written by training) is missing")
    cfg = load_config(cfg_file, overrides)
    meta = json.loads((ckpt / "meta.json").read_text())
    states = sorted((ckpt / "engine").glob("mp_rank_*_model_states.pt"))
    if states:  # ZeRO 0-2: one consolidated module state
        module = torch.load(states[0], map_location="cpu", weights_only=False).get("module")
    elif sorted((ckpt / "engine").glob("zero_pp_rank_*_model_states.pt")):
        module = None  # ZeRO-3: parameters live only in the per-rank partitions
    else:
        raise FileNotFoundError(f"no DeepSpeed model states (engine/*model_states.pt) in {ckpt}")
    if not module:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")
    C = cfg.model.num_classes
    model = SSTModel(cfg.model, torch.zeros(C, C))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in module.items()})
    model.eval()
    return model, cfg, meta


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, run directory or converted checkpoint file")
    parser.add_argument("--config", default=None, help="run config (needed for a converted checkpoint file)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the run's config")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write ap_*.json/png (default: checkpoint)"
    )
    parser.add_argument("--max-batches", type=int, default=0, help="evaluate only this many batches per rank")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_shards.loaders import build_loader
    from sst_dist.train import distributed as D
    from sst_dist.train.evaluate import evaluate_model
    from sst_dist.train.logging_utils import setup_logging

    try:
        if is_converted_file(args.checkpoint):
            model, cfg, meta = load_converted_model(args.checkpoint, args.config, args.overrides)
        else:
            model, cfg, meta = load_checkpoint_model(args.checkpoint, args.overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"sst-dist eval: {e}", file=sys.stderr)
        return 2
    D.init_distributed()
    setup_logging()
    device = D.local_device()
    model.to(device)
    d = cfg.data
    loader = build_loader(
        d.root,
        d.test_split,
        train=False,
        batch_size=cfg.train.batch_size,
        image_size=d.image_size,
        proportion=d.proportion,
        seed=d.seed,
        rank=D.rank(),
        world_size=D.world_size(),
        num_workers=d.num_workers,
        backend=d.backend,
        num_classes=cfg.model.num_classes,
    )
    converted = is_converted_file(args.checkpoint)
    ckpt = Path(args.checkpoint) if converted else resolve_checkpoint(args.checkpoint)
    result = evaluate_model(
        model,
        loader,
        device,
        torch.float32,
        args.out or (ckpt.parent if converted else ckpt),
        f"{ckpt.stem}_{d.test_split}",
        meta.get("class_names"),
        args.max_batches,
    )
    if result is not None:
        summary = {k: v for k, v in result.items() if k != "ap"}
        print(json.dumps({"checkpoint": str(ckpt), **summary}))
    return 0
