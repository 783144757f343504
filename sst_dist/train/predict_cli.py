"""``sst-dist predict CHECKPOINT IMAGES...``: one JSON line per image with its labels and scores.

Images get the evaluation transform (bicubic resize to ``data.image_size``, ImageNet mean/std).
A label is predicted where its logit >= ``--threshold`` (0 = probability 0.5, the protocol's rule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """(3,size,size) float tensor, normalized; a clear error for a missing/undecodable file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(
                im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
            )
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    t = torch.from_numpy(arr).permute(2, 0, 1) / 255.0
    return (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or run directory")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--threshold", type=float, default=0.0, help="logit threshold for a predicted label")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.set_defaults(func=run)


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from sst_dist.train.evaluate_cli import load_checkpoint_model

    try:
        model, cfg, meta = load_checkpoint_model(args.checkpoint)
        images = [load_image(p, cfg.data.image_size) for p in args.images]
    except (FileNotFoundError, ValueError) as e:
        print(f"sst-dist predict: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    names = meta.get("class_names") or [f"class_{i}" for i in range(cfg.model.num_classes)]
    for start in range(0, len(images), args.batch_size):
        batch = torch.stack(images[start : start + args.batch_size]).to(device)
        logits = model(batch).logits.float().cpu()
        for path, row in zip(args.images[start : start + args.batch_size], logits):
            scores = torch.sigmoid(row).tolist()
            print(
                json.dumps(
                    {
                        "image": str(path),
                        "labels": [n for n, x in zip(names, row.tolist()) if x >= args.threshold],
                        "scores": {n: round(s, 6) for n, s in zip(names, scores)},
                    }
                )
            )
    return 0
