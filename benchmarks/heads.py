"""Benchmark SST's post-backbone work, reference vs fused (DESIGN §2 identities), on the CPU.

Default mode times forward+backward of everything after the backbone: ``SSTModel.heads``, intra
pseudo labels, memory-bank update + inter pseudo labels, the five loss terms and the backward,
at COCO sizes (C=80, S=49, B=8, F=1024) in float32, interleaving the two implementations.
Memory: (1) bytes autograd keeps for backward (distinct non-parameter storages, via
``saved_tensors_hooks``) and (2) peak RSS growth (VmHWM) of one step in a fresh subprocess per impl.
``--full-step`` times a whole training step (ResNet-101 at 448, layer4 trainable, B=8, Adam)
for both impls and the backbone-only step.

    .venv/bin/python benchmarks/heads.py [--repeats 5] [--full-step --full-repeats 3] [--out F]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_shards.results_out import OVERWRITE_HELP, OutputRefused, file_output  # noqa: E402
from sst_dist.config import RunConfig  # noqa: E402
from sst_dist.model import ModelConfig, SSTModel, cooccurrence_adjacency  # noqa: E402
from sst_dist.train.state import DistributedSST  # noqa: E402

IMPLS = ("reference", "fused")
EPOCH = 5  # first epoch with pseudo labels: every term active
MARGIN = 0.95


def build(args: argparse.Namespace, backbone: str, freeze: str = "layer4") -> tuple[SSTModel, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (args.batch, args.classes), generator=g)
    partial = torch.randint(-1, 2, (200, args.classes), generator=g)
    cfg = ModelConfig(
        num_classes=args.classes, backbone=backbone, feature_dim=args.feature_dim, freeze=freeze
    )
    torch.manual_seed(0)
    model = SSTModel(cfg, cooccurrence_adjacency(partial)).train()
    for _ in range(3):  # fill the bank so similarities are real work
        model.bank.update(torch.randn(64, args.classes, args.feature_dim), torch.ones(64, args.classes))
    return model, labels


_STATES: dict[int, DistributedSST] = {}


def sst_state(model: SSTModel, batch: int) -> DistributedSST:
    """The trainer's SST state for ``model`` (one per model): the code Trainer.train_step runs."""
    if id(model) not in _STATES:
        cfg = RunConfig(model.cfg)
        cfg.train.batch_size = batch
        sst = DistributedSST(cfg, model)
        sst.set_epoch(EPOCH)
        sst.margins = {"intra": MARGIN, "inter": MARGIN}
        _STATES[id(model)] = sst
    return _STATES[id(model)]


def post_backbone_loss(model: SSTModel, X: torch.Tensor, labels: torch.Tensor, impl: str) -> torch.Tensor:
    """Heads, then exactly what the trainer's step runs after the forward pass
    (``DistributedSST.compute``: bank update, both kinds of pseudo labels, the one loss path)."""
    model.impl = impl
    out = model.heads(X)
    return sst_state(model, labels.shape[0]).compute(out, labels.float(), None, EPOCH, 1.0).loss


def step_loss(model: SSTModel, X: torch.Tensor, labels: torch.Tensor, impl: str | None) -> torch.Tensor:
    """The loss a timed full step backpropagates: SST's (``impl``), or for ``impl=None`` a trivial
    one on the trunk's features, which makes the backbone-only step the full steps are read against."""
    return X.square().mean() if impl is None else post_backbone_loss(model, X, labels, impl)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(); CPU time is the steadier number on a shared host."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def heads_step(model: SSTModel, X: torch.Tensor, labels: torch.Tensor, impl: str) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    X.grad = None
    return timed(lambda: post_backbone_loss(model, X, labels, impl).backward())


def saved_bytes(model: SSTModel, X: torch.Tensor, labels: torch.Tensor, impl: str) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = post_backbone_loss(model, X, labels, impl)
    loss.backward()
    return sum(seen.values())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    """VmHWM of this process. (ru_maxrss is not used: Linux carries it over from the parent.)"""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: peak RSS growth of one post-backbone step of ``args.rss_child``.

    The parent fixes glibc's mmap threshold, so large blocks go back to the OS when freed; after a
    warm-up step (one-time allocations stay resident) the high-water mark is reset to the current
    RSS, so the second step's growth over that baseline is the step's extra peak memory.
    """
    model, labels = build(args, "resnet18")
    X = torch.randn(args.batch, args.spatial, args.feature_dim, requires_grad=True)
    heads_step(model, X, labels, args.rss_child)
    reset = _reset_peak()
    before = _rss_bytes()
    heads_step(model, X, labels, args.rss_child)
    peak = _peak_bytes()
    print(json.dumps({"rss_before": before, "peak_after": peak, "extra": peak - before, "peak_reset": reset}))


def measure_rss(impl: str, args: argparse.Namespace) -> dict[str, int]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--rss-child",
        impl,
        "--classes",
        str(args.classes),
        "--batch",
        str(args.batch),
        "--spatial",
        str(args.spatial),
        "--feature-dim",
        str(args.feature_dim),
        "--threads",
        str(torch.get_num_threads()),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), "MALLOC_TRIM_THRESHOLD_": str(1 << 17)}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Run each variant ``repeats`` times, alternating the order every round (shared-CPU noise)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = fns[name]()
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    return times


def run_heads(args: argparse.Namespace) -> dict:
    model, labels = build(args, "resnet18")
    X = torch.randn(args.batch, args.spatial, args.feature_dim, requires_grad=True)
    fns = {i: lambda i=i: heads_step(model, X, labels, i) for i in IMPLS}
    times = interleaved(fns, args.repeats, args.warmup)
    saved = {i: saved_bytes(model, X, labels, i) for i in IMPLS}
    rss = {i: measure_rss(i, args) for i in IMPLS} if not args.no_rss else {}
    return {"times_s": times, "saved_bytes": saved, "rss": rss}


def run_full(args: argparse.Namespace) -> dict:
    model, labels = build(args, "resnet101")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)

    def step(impl: str | None) -> tuple[float, float]:
        def body() -> None:
            X = model.backbone_features(images)
            step_loss(model, X, labels, impl).backward()
            opt.step()

        opt.zero_grad(set_to_none=True)
        return timed(body)

    fns = {"backbone_only": lambda: step(None), **{i: lambda i=i: step(i) for i in IMPLS}}
    return {"times_s": interleaved(fns, args.full_repeats, warmup=0)}


def med(times: dict[str, dict[str, list[float]]], kind: str) -> dict[str, float]:
    return {k: statistics.median(v[kind]) for k, v in times.items()}


def report(res: dict, full: dict | None) -> list[str]:
    wall, cpu = med(res["times_s"], "wall"), med(res["times_s"], "cpu")
    mib = 2**20
    lines = [
        "post-backbone step (heads + pseudo labels + bank + losses, fwd+bwd), medians:",
        f"{'impl':10s} {'wall s':>8s} {'CPU s':>8s} {'saved MiB':>10s} {'RSS+ MiB':>9s}",
    ]
    for i in IMPLS:
        rss = res["rss"].get(i, {}).get("extra", float("nan")) / mib
        lines.append(f"{i:10s} {wall[i]:8.3f} {cpu[i]:8.3f} {res['saved_bytes'][i] / mib:10.1f} {rss:9.1f}")
    sb = res["saved_bytes"]
    lines.append(
        f"ratio reference/fused: wall {wall['reference'] / wall['fused']:.2f}x, "
        f"CPU {cpu['reference'] / cpu['fused']:.2f}x; fused/reference memory: "
        f"saved-for-backward {sb['fused'] / sb['reference']:.3f}"
        + (
            f", peak-RSS growth {res['rss']['fused']['extra'] / max(1, res['rss']['reference']['extra']):.3f}"
            if res["rss"]
            else ""
        )
    )
    if full:
        fw, fc = med(full["times_s"], "wall"), med(full["times_s"], "cpu")
        lines.append("full training step (ResNet-101 layer4 trainable + heads + losses + Adam), medians:")
        for k in fw:
            lines.append(f"{k:14s} wall {fw[k]:8.2f} s   CPU {fc[k]:8.2f} s")
        lines.append(
            f"full-step ratio reference/fused: wall {fw['reference'] / fw['fused']:.2f}x, "
            f"CPU {fc['reference'] / fc['fused']:.2f}x"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.environ.get("SST_BENCH_PROG"), description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--spatial", type=int, default=49, help="S = number of feature-map positions")
    p.add_argument("--feature-dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-rss", action="store_true", help="skip the per-impl subprocess RSS measurement")
    p.add_argument("--full-step", action="store_true", help="also time whole training steps (ResNet-101)")
    p.add_argument("--full-repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on a shared host; 0: torch default)",
    )
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/heads-<date>.json)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lows = {"classes": 2, "batch": 1, "spatial": 1, "feature_dim": 1, "repeats": 1, "warmup": 0,
            "full_repeats": 1, "image_size": 32, "threads": 0}
    for name, low in lows.items():
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return 0
    default = os.path.join(ROOT, "benchmarks", "results", f"heads-{dt.date.today().isoformat()}.json")
    try:  # before any work: a refused output would otherwise lose the run's numbers
        results = file_output(args.out, default, overwrite=args.overwrite)
    except OutputRefused as e:
        return e.exit(p.prog)
    res = run_heads(args)
    full = run_full(args) if args.full_step else None
    lines = report(res, full)
    print("\n".join(lines))
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "config": {k: v for k, v in vars(args).items() if k != "rss_child"},
    }
    out = results.write(json.dumps({"meta": meta, "heads": res, "full_step": full, "table": lines}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
