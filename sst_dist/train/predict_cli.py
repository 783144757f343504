"""``sst-dist predict CHECKPOINT IMAGES...``: one JSON line per image with its labels and scores.

CHECKPOINT is anything ``sst-dist eval`` takes, converted files included (their own model config
decides the model; ``--config`` may add the data settings, e.g. ``data.image_size``). Each image
is read as the 8-bit RGB picture a viewer shows (``data_shards.images.open_rgb``: EXIF
orientation, transparency on white, 16-bit scaled, a pixel limit against decompression bombs)
and gets the loaders' own evaluation transform (``data_shards.loaders.augment.eval_tensor``).
An image that cannot be read is reported on stderr and skipped; the others are still predicted.
The printed scores are probabilities (the sigmoid of each logit); ``--threshold`` applies to the
logits: a label is predicted where its logit >= THRESHOLD, i.e. its score >= sigmoid(THRESHOLD)
(default 0: score >= 0.5, the protocol's rule).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

EXIT_STATUSES = """exit status:
  0  every image predicted
  2  bad input: a bad argument (e.g. a non-finite --threshold) or a missing/damaged/unsafe
     checkpoint or config (nothing predicted), or at least one image (a missing, non-image or
     damaged file, a directory) could not be read (each named on stderr; every other image was
     still predicted)"""


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """(3,size,size) normalized float tensor: exactly what the eval loaders give for this image."""
    from data_shards.images import open_rgb
    from data_shards.loaders.augment import eval_tensor

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    try:
        return eval_tensor(open_rgb(path), size)
    except ValueError as e:
        if _unidentified(e):
            raise ValueError(f"{path}: not an image file (no image format recognised)") from None
        # PIL names the in-memory buffer it was given, not the file: put the path there
        raise ValueError(_BUFFER.sub(str(path), str(e))) from None


_BUFFER = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _unidentified(e: BaseException) -> bool:
    """True when PIL recognised no image format in the file (its UnidentifiedImageError)."""
    from PIL import UnidentifiedImageError

    return isinstance(e.__cause__, UnidentifiedImageError)


def _finite_float(text: str) -> float:
    """argparse type of ``--threshold``: a finite number (nan/inf would predict nothing or all)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def register(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sst-dist predict``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES
    parser.add_argument(
        "checkpoint", help="run directory, checkpoint directory, best/latest pointer or converted file"
    )
    parser.add_argument("images", nargs="+", help="image files (a directory is reported, not searched)")
    parser.add_argument("--config", default=None, help="run config to take data settings from (optional)")
    parser.add_argument(
        "--threshold",
        type=_finite_float,
        default=0.0,
        help="a label is predicted where its logit >= THRESHOLD, i.e. its printed score (the sigmoid "
        "probability) >= sigmoid(THRESHOLD); default 0.0 = score >= 0.5",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled objects in the checkpoint files (they can run code: only for files you trust)",
    )
    parser.set_defaults(func=run)


def _readable(paths: list[str], size: int, failed: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of each image that reads; the others are reported and listed in ``failed``."""
    for p in paths:
        try:
            yield p, load_image(p, size)
        except (OSError, ValueError) as e:
            print(f"sst-dist predict: {e}", file=sys.stderr)
            failed.append(p)


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    """Predict every readable image in batches; non-zero exit if any image was unreadable."""
    from data_shards.safe_io import UnsafePathError
    from sst_dist.train.inference import load_for_inference
    from sst_dist.train.logging_utils import Ticker

    if args.batch_size < 1:
        print(f"sst-dist predict: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        model, cfg, meta = load_for_inference(args.checkpoint, args.config, trust=args.trust_checkpoint)
    except (FileNotFoundError, ValueError, UnsafePathError) as e:
        print(f"sst-dist predict: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    names = meta.get("class_names") or [f"class_{i}" for i in range(cfg.model.num_classes)]
    failed: list[str] = []
    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        logits = model(torch.stack([t for _, t in batch]).to(device)).logits.float().cpu()
        for (path, _), row in zip(batch, logits):
            scores = torch.sigmoid(row).tolist()
            labels = [n for n, x in zip(names, row.tolist()) if x >= args.threshold]
            line = {
                "image": str(path),
                "labels": labels,
                "scores": {n: round(s, 6) for n, s in zip(names, scores)},
            }
            print(json.dumps(line), flush=True)
        batch.clear()

    ticker = Ticker("predicting: image", len(args.images), lambda m: print(f"sst-dist {m}", file=sys.stderr))
    for item in _readable(args.images, cfg.data.image_size, failed):
        ticker.tick()
        batch.append(item)
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    if failed:
        print(
            f"sst-dist predict: {len(failed)} of {len(args.images)} images could not be read", file=sys.stderr
        )
        return 2
    return 0
