"""``sst-dist smoke``: one forward + backward of SSTModel on random data, to check an install.

Prints output shapes, a few loss-free sanity numbers (finite outputs, gradient norms) and timings.
"""

from __future__ import annotations

import argparse
import time

import torch


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


def _run(args: argparse.Namespace) -> int:
    stats = run_smoke(args.backbone, args.classes, args.batch_size, args.image_size, args.impl, args.device)
    print(
        f"smoke: backbone={args.backbone} C={args.classes} B={args.batch_size} "
        f"image={args.image_size} impl={args.impl} device={args.device}"
    )
    for key, value in stats.items():
        print(f"  {key:18s} {value:.6g}")
    ok = stats["finite"] == 1.0 and stats["params_with_grad"] == stats["trainable_params"]
    print("smoke: OK" if ok else "smoke: FAILED (non-finite values or parameters without gradient)")
    return 0 if ok else 1


def register(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sst-dist smoke``."""
    parser.add_argument("--backbone", default="resnet18", help="resnet18|resnet34|resnet50|resnet101")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--impl", default="fused", choices=("reference", "fused", "triton"))
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=_run)
