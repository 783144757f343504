"""Full SST training step on one device: impl reference vs fused vs triton, side by side.

Also times the backbone-only step (the same trunk forward+backward and Adam step, trivial loss),
so each full step reads as a multiple of it (issue 12: full step <= 1.15x backbone-only).

Images/s of forward (backbone + heads), both kinds of pseudo labels, bank update, all losses,
backward and an Adam step, at the COCO shape (ResNet-101, 448, C=80) under bf16 autocast on a
GPU. The impls run interleaved on the same model and batch, so their ratio is what to read.
Runs on CPU too (small shapes) so the script is known to work before a GPU session.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from heads import step_loss  # noqa: E402

from data_shards.results_out import OVERWRITE_HELP, OutputRefused, file_output  # noqa: E402
from sst_dist.model import ModelConfig, SSTModel, cooccurrence_adjacency  # noqa: E402
from sst_dist.train.batch import trunk_layout  # noqa: E402
from sst_dist.train.engine_setup import place_model  # noqa: E402


def step_seconds(model: SSTModel, opt, images, labels, impl: str | None, dtype, device) -> float:
    """Wall seconds of one full step; ``impl=None`` is the backbone-only step (heads.step_loss)."""
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        X = model.backbone_features(images)
        loss = step_loss(model, X.float() if impl == "reference" else X, labels, impl)
    loss.float().backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def fold_frozen_bn(model: SSTModel) -> tuple[torch.nn.Module, float]:
    """The trunk with its frozen prefix (the parts that do not train) folded: every eval-mode
    BatchNorm merged into its convolution by torch.fx's conv-BN fusion, on a copy; the trained
    parts are the model's own modules. Returns the trunk and the prefix's largest output change
    on a test batch (folding is exact up to rounding). An experiment for issue 12: the trainer
    does not fold, because a folded model no longer has the checkpoint's parameters."""
    import copy

    from torch.fx.experimental.optimization import fuse

    trunk, trained = model.backbone.trunk, set(model.backbone.trainable_parts)
    names = [n for n, _ in trunk.named_children()]
    cut = next(i for i, n in enumerate(names) if n in trained)
    prefix = torch.nn.Sequential(*[getattr(trunk, n) for n in names[:cut]])
    folded = fuse(copy.deepcopy(prefix).eval())
    folded.requires_grad_(False)
    place_model(folded, next(trunk.parameters()).device)
    x = trunk_layout(torch.randn(2, 3, 128, 128, device=next(trunk.parameters()).device))
    with torch.no_grad():
        err = (folded(x) - prefix(x)).abs().max().item()
    return torch.nn.Sequential(folded, *[getattr(trunk, n) for n in names[cut:]]), err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--impls", nargs="+", default=["reference", "fused", "triton"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-trunk", action="store_true",
                   help="also time each impl with torch.compile(trunk) (compiled in the warm-up)")
    p.add_argument("--fold-bn", action="store_true",
                   help="also time the trunk with its frozen BatchNorms folded into the convolutions")
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/, dated)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    default = f"benchmarks/results/gpu-step-{name.replace(' ', '_')}-{dt.date.today()}.json"
    try:  # before any work: a refused output would otherwise lose the measurements
        results = file_output(args.out, default, overwrite=args.overwrite)
    except OutputRefused as e:
        raise SystemExit(e.exit(p.prog)) from None
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    partial = torch.randint(-1, 2, (500, args.classes), generator=g)
    labels = torch.randint(-1, 2, (args.batch, args.classes), generator=g).to(device)
    torch.manual_seed(0)
    model = SSTModel(ModelConfig(num_classes=args.classes, backbone=args.backbone, freeze="layer4"),
                     cooccurrence_adjacency(partial)).train()
    place_model(model, device)  # as the trainer does (channels-last weights on CUDA)
    with torch.no_grad():  # a filled bank, so the similarities are real work
        model.bank.update(torch.randn(128, args.classes, model.cfg.feature_dim, device=device),
                          torch.ones(128, args.classes, device=device))
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=True)
    images = trunk_layout(torch.randn(args.batch, 3, args.image_size, args.image_size, device=device))
    trunks = {"eager": model.backbone.trunk}
    if args.compile_trunk:  # an experiment for issue 12: does compiling the trunk pay on this device?
        trunks["compiled"] = torch.compile(model.backbone.trunk)
    impls: list[str | None] = [None, *args.impls]  # None: the backbone-only step
    if args.fold_bn:  # an experiment for issue 12: does folding the frozen BatchNorms pay?
        trunks["folded"], err = fold_frozen_bn(model)
        print(f"folded frozen prefix: largest output change {err:.2e}")
    variants = {(impl or "backbone") + ("" if trunk == "eager" else f"+{trunk}"): (impl, trunk)
                for trunk in trunks for impl in impls}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.warmup + args.repeats):
        for v, (impl, trunk) in variants.items():  # interleaved
            model.backbone.trunk = trunks[trunk]  # same parameters, eager or compiled
            t = step_seconds(model, opt, images, labels, impl, dtype, device)
            if r >= args.warmup:
                times[v].append(t)
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    print(f"full SST step on {name}, {args.backbone} at {args.image_size}, B={args.batch}, "
          f"C={args.classes}, {args.precision}; medians of {args.repeats}, interleaved")
    print(f"{'impl':>18} {'s/step':>9} {'img/s':>9} {'vs reference':>13} {'/ backbone':>11}")
    for impl, t in med.items():
        ratio = med["reference"] / t if "reference" in med else float("nan")
        base = med["backbone" + impl[impl.index("+"):] if "+" in impl else "backbone"]  # same trunk
        print(f"{impl:>18} {t:9.4f} {args.batch / t:9.1f} {ratio:12.2f}x {t / base:10.2f}x")
    out = results.write(json.dumps({"device": name, "date": str(dt.date.today()), "args": vars(args),
                                    "seconds": times, "median_s": med}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
