"""``sst-dist smoke``: one forward + backward of SSTModel on random data, to check an install.

Prints output shapes, a few loss-free sanity numbers (finite outputs, gradient norms) and timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from sst_dist.model.config import BACKBONES

# the trunk's stride 32 times the neck's 2x2 pool: smaller images leave no spatial position
MIN_IMAGE_SIZE = 64


def run_smoke(
    backbone: str = "resnet18",
    num_classes: int = 20,
    batch_size: int = 2,
    image_size: int = 224,
    impl: str = "fused",
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Build a random SST model, run forward/backward once, return sanity numbers."""
    from sst_dist.model import ModelConfig, SSTModel, cooccurrence_adjacency

    torch.manual_seed(seed)
    adjacency = cooccurrence_adjacency(torch.randint(-1, 2, (4 * num_classes, num_classes)))
    cfg = ModelConfig(num_classes=num_classes, backbone=backbone, impl=impl)
    model = SSTModel(cfg, adjacency).to(device).train()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    t0 = time.perf_counter()
    out = model(images)
    t1 = time.perf_counter()
    # loss-free scalar touching every output, so every trainable parameter receives a gradient
    (out.logits.mean() + out.pair_logits.mean() + out.features.square().mean()).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    finite = all(torch.isfinite(t).all() for t in out) and all(
        g is not None and torch.isfinite(g).all() for g in grads
    )
    return {
        "logits_mean": out.logits.mean().item(),
        "logits_std": out.logits.std().item(),
        "pair_logits_mean": out.pair_logits.mean().item(),
        "feature_norm_mean": out.features.norm(dim=-1).mean().item(),
        "grad_norm": torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).item(),
        "params_with_grad": float(sum(g is not None for g in grads)),
        "trainable_params": float(len(grads)),
        "finite": float(finite),
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
    }


def _device_problem(device: str, impl: str) -> str | None:
    """Why ``--device``/``--impl`` cannot run here (one line), or None."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA device is available here (use --device cpu)"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
    if impl == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "--impl triton needs a CUDA --device (or TRITON_INTERPRET=1 for the CPU interpreter)"
    return None


def _run(args: argparse.Namespace) -> int:
    problem = _device_problem(args.device, args.impl)
    if problem:
        print(f"sst-dist smoke: {problem}", file=sys.stderr)
        return 2
    try:
        stats = run_smoke(
            args.backbone, args.classes, args.batch_size, args.image_size, args.impl, args.device
        )
    except ValueError as e:  # training-mode BatchNorm over a single value per channel
        if "more than 1 value per channel" not in str(e):
            raise
        print(f"sst-dist smoke: --batch-size {args.batch_size} at --image-size {args.image_size} leaves one "
              "value per BatchNorm channel; use --batch-size 2 or a larger --image-size", file=sys.stderr)
        return 2
    print(
        f"smoke: backbone={args.backbone} C={args.classes} B={args.batch_size} "
        f"image={args.image_size} impl={args.impl} device={args.device}"
    )
    for key, value in stats.items():
        print(f"  {key:18s} {value:.6g}")
    ok = stats["finite"] == 1.0 and stats["params_with_grad"] == stats["trainable_params"]
    print("smoke: OK" if ok else "smoke: FAILED (non-finite values or parameters without gradient)")
    return 0 if ok else 1


EXIT_STATUSES = """exit status:
  0  smoke: OK (finite outputs, every trainable parameter got a finite gradient)
  1  smoke: FAILED (non-finite values or parameters without gradient): the install is broken
  2  bad arguments: an unknown backbone or impl, a size out of range, a batch too small for the
     image size (one value per BatchNorm channel), a device that is not available (one line on
     stderr)"""


def _at_least(low: int):
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def register(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sst-dist smoke``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES
    parser.add_argument(
        "--backbone",
        default="resnet18",
        choices=list(BACKBONES),
        metavar="NAME",
        help=f"trunk: {', '.join(BACKBONES)} (default resnet18)",
    )
    parser.add_argument(
        "--classes", type=_at_least(2), default=20, help="number of labels, >= 2 (default 20)"
    )
    parser.add_argument("--batch-size", type=_at_least(1), default=2, help="random images (default 2)")
    parser.add_argument(
        "--image-size",
        type=_at_least(MIN_IMAGE_SIZE),
        default=224,
        help=f"image side in pixels, >= {MIN_IMAGE_SIZE} (default 224)",
    )
    parser.add_argument(
        "--impl",
        default="fused",
        choices=("reference", "fused", "triton"),
        help="head implementation (default fused; triton needs a CUDA device)",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.set_defaults(func=_run)
