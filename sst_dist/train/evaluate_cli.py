"""``sst-dist eval CHECKPOINT [key.sub=value ...]``: evaluate a checkpoint on the test split.

CHECKPOINT is a checkpoint directory (``.../checkpoints/epoch_0003``), a pointer file
(``.../checkpoints/best`` or ``latest``), a run directory (its ``latest`` checkpoint is used),
or a file written by ``sst-dist convert-checkpoint`` (an official SST model; then ``--config``
names the run config that gives the data). Every ZeRO stage's checkpoints load, and nothing in
them is unpickled unless ``--trust-checkpoint`` says so (``sst_dist.train.inference``).

The checkpoint's model config decides the model: a run config or override that disagrees with
it in a field that changes outputs (``model.time_steps``, widths, backbone...) is an error.
Overrides change e.g. ``data.root`` or ``data.test_split``. Runs on any number of ranks (same
launchers as training), each on its GPU when there is one; scores are gathered in dataset order,
rank 0 prints the table and one JSON line and writes the per-class AP JSON/PNG into ``--out``
(default: the checkpoint directory, or the converted file's directory). Their name says what was
evaluated (the run, when ``--out`` may be shared; ``_first<N>`` for ``--max-batches N``), and an
earlier result of that name is kept unless ``--overwrite``: checked before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

EXIT_STATUSES = """exit status:
  0  evaluated; the metrics JSON line is on stdout
  2  bad input: missing/damaged/unsafe checkpoint, pointer outside its run, bad or disagreeing
     config, missing dataset, an earlier result in the way without --overwrite (one line on
     stderr naming the file or key)"""


def register(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sst-dist eval``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES
    parser.add_argument(
        "checkpoint", help="run directory, checkpoint directory, best/latest pointer or converted file"
    )
    parser.add_argument(
        "--config", default=None, help="run config giving the data (needed for a converted checkpoint file)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the run config")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for ap_<checkpoint>_<split>.json/png (default: inside the checkpoint directory "
        "itself, e.g. RUN/checkpoints/epoch_0003/; for a converted file, the directory holding it; "
        "training's own per-epoch evaluations are in RUN/eval/)",
    )
    parser.add_argument(
        "--max-batches",
        type=_non_negative,
        default=0,
        metavar="N",
        help="evaluate only the first N batches per rank (default 0: all batches)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier result of the same name in --out"
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled objects in the checkpoint files (they can run code: only for files you trust)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def _non_negative(text: str) -> int:
    """argparse type of ``--max-batches``: an integer >= 0 (0 means every batch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: all batches), got {value}")
    return value


def result_tag(ckpt: Path, kind: str, split: str, max_batches: int, shared_out: bool) -> str:
    """The name of an evaluation's AP files: checkpoint and split, the run when ``--out`` may
    gather several runs' results, and the batch limit of a partial evaluation."""
    tag = f"{ckpt.stem}_{split}"
    if shared_out and kind != "converted":  # RUN/checkpoints/epoch_0003 -> RUN_epoch_0003_test
        tag = f"{ckpt.parent.parent.name}_{tag}"
    return f"{tag}_first{max_batches}" if max_batches else tag


def _fail(e: BaseException) -> int:
    print(f"sst-dist eval: {e}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Load through the one inference path, build the test loader, evaluate, print the summary."""
    from data_shards import format as fmt
    from data_shards.loaders import build_loader
    from data_shards.safe_io import UnsafePathError
    from sst_dist.train import distributed as D
    from sst_dist.train.data import check_class_names
    from sst_dist.train.evaluate import evaluate_model
    from sst_dist.train.inference import load_for_inference
    from sst_dist.train.logging_utils import setup_logging

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        return _fail(ValueError(f"--out {args.out}: exists and is not a directory"))
    try:
        model, cfg, meta = load_for_inference(
            args.checkpoint, args.config, args.overrides, trust=args.trust_checkpoint
        )
        if meta["kind"] == "converted" and args.config is None:  # its data would be a guess
            raise ValueError(f"{args.checkpoint} is a converted checkpoint file: pass --config RUN_CONFIG")
        d = cfg.data
        names = (
            meta.get("class_names") or fmt.read_info(d.root, d.test_split, cfg.model.num_classes)["classes"]
        )
    except (FileNotFoundError, ValueError, UnsafePathError) as e:
        return _fail(e)
    D.init_distributed()
    setup_logging()
    device = D.local_device()
    model.to(device)
    try:
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
        if meta.get("class_names"):  # scoring against other classes would give a meaningless mAP
            check_class_names(meta["class_names"], loader.shards.info["classes"],
                              f"test split {d.test_split!r} in data.root={d.root}",
                              "the checkpoint's training data")
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    ckpt: Path = meta["checkpoint"]
    out = args.out or (ckpt.parent if meta["kind"] == "converted" else ckpt)
    tag = result_tag(ckpt, meta["kind"], d.test_split, args.max_batches, shared_out=args.out is not None)
    if (out / f"ap_{tag}.json").exists() and not args.overwrite:
        return _fail(ValueError(f"{out / f'ap_{tag}.json'} holds an earlier result; pass --overwrite "
                                "to replace it, or --out another directory"))
    try:
        result = evaluate_model(model, loader, device, torch.float32, out, tag, names, args.max_batches)
    except UnsafePathError as e:
        return _fail(e)
    if result is not None:
        summary = {k: v for k, v in result.items() if k != "ap"}
        print(json.dumps({"checkpoint": str(ckpt), **summary}))
    return 0
