"""Images/s of the train augmentation at 448 for every available loader backend and a reference-style
PIL pipeline, with the same number of CPU workers, on COCO-like JPEGs (640x480, ~100 KB).

    python benchmarks/loader.py [--images 200] [--workers 1 2] [--batch-size 16] [--epochs 2]

Prints a table and writes ``benchmarks/results/loader-<date>.json``; the fastest CPU backend is
the ``AUTO_CPU_BACKEND`` of :mod:`data_shards.loaders`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_shards.loaders import build_loader  # noqa: E402
from data_shards.loaders.dali_loader import dali_available  # noqa: E402
from data_shards.results_out import OVERWRITE_HELP, OutputRefused, dir_output  # noqa: E402
from data_shards.writer import ShardWriter  # noqa: E402


def photo_like(rng: np.random.Generator, w: int = 640, h: int = 480) -> bytes:
    """Smooth background, shapes, blur and sensor-like noise: compresses to about 100 KB at quality 90."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c = rng.uniform(0, 255, (3, 3))
    wave = 40 * np.sin(yy[..., None] / rng.uniform(20, 80, 3))
    bg = c[:, 0] + (c[:, 1] - c[:, 0]) * (xx / w)[..., None] + wave
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(im.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    arr += rng.normal(0, 10, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n: int) -> tuple[Path, list[Path]]:
    """Shards (ShardWriter) and the same JPEGs as loose files for the reference pipeline."""
    rng = np.random.default_rng(0)
    files = []
    (root / "jpg").mkdir()
    with ShardWriter(root / "shards", "bench", "train", [f"c{k}" for k in range(80)], shard_bytes=5e6) as w:
        for i in range(n):
            data = photo_like(rng)
            (root / "jpg" / f"{i}.jpg").write_bytes(data)
            files.append(root / "jpg" / f"{i}.jpg")
            w.write(i, data, np.where(rng.random(80) < 0.05, 1, -1))
    return root / "shards", files


class ReferenceStyle(torch.utils.data.Dataset):
    """Per-image PIL + torchvision.transforms, one image per __getitem__ (the reference's layout)."""

    def __init__(self, files: list[Path]):
        import torchvision.transforms as T

        self.files = files
        scales = [512, 448, 384, 320, 256]

        def crop(im):  # random square crop of a side from scales at a random position
            side = int(np.random.choice(scales))
            x, y = np.random.randint(0, 512 - side + 1, size=2)
            return im.crop((int(x), int(y), int(x) + side, int(y) + side))

        self.tf = T.Compose([T.Resize((512, 512), interpolation=T.InterpolationMode.BICUBIC), T.Lambda(crop),
                             T.Resize((448, 448), interpolation=T.InterpolationMode.BICUBIC),
                             T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.tf(Image.open(self.files[i]).convert("RGB")), i


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers are joined at the end)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(make, epochs: int) -> tuple[float, float, int]:
    """(images/s after one warm-up batch, CPU ms per image over the whole run, images timed).

    On a shared machine wall-clock rates move with the other users' load; CPU time per image
    is the steadier measure of the work each pipeline does.
    """
    cpu0 = _cpu_seconds()
    loader = make()
    n, total, t0 = 0, 0, None
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch.images
            total += images.shape[0]
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += images.shape[0]
    rate = n / (time.perf_counter() - t0)
    del loader
    return rate, 1e3 * (_cpu_seconds() - cpu0) / total, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=os.environ.get("SST_BENCH_PROG"),
                                 description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration, in shuffled order")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"),
                    help="folder for loader-<date>.json (default benchmarks/results)")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    for name, low in (("images", 1), ("batch_size", 1), ("epochs", 1), ("repeats", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if min(args.workers) < 0:
        ap.error(f"--workers must be >= 0, got {min(args.workers)}")
    if args.images < args.batch_size:
        ap.error(f"--images {args.images} is fewer than one batch (--batch-size {args.batch_size})")
    try:  # before any work: a refused output would otherwise lose the run's numbers
        results = dir_output(args.out, [f"loader-{dt.date.today()}.json"], overwrite=args.overwrite)
    except OutputRefused as e:
        return e.exit(ap.prog)
    cuda = torch.cuda.is_available()
    backends = ["torch"] + (["dali"] if dali_available() else []) + (["torch-gpu"] if cuda else [])
    device = "cuda" if cuda else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir, files = make_data(Path(tmp), args.images)
        kb = np.mean([f.stat().st_size for f in files]) / 1024
        print(f"{args.images} JPEGs 640x480, mean {kb:.0f} KB; batch {args.batch_size}; "
              f"cpus {os.cpu_count()}; load {os.getloadavg()[0]:.1f}")
        configs = [(name, w) for w in args.workers for name in backends + ["reference-pil"]]
        runs: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
        order = [c for _ in range(args.repeats) for c in configs]
        random.Random(0).shuffle(order)
        for name, workers in order:
            dev = device if name in ("dali", "torch-gpu") else "cpu"
            if name == "reference-pil":
                def make(w=workers):
                    return torch.utils.data.DataLoader(ReferenceStyle(files), batch_size=args.batch_size,
                                                       shuffle=True, num_workers=w, drop_last=True)
            else:
                def make(name=name, w=workers, dev=dev):
                    return build_loader(shard_dir, "train", True, args.batch_size, 448, backend=name,
                                        num_workers=w, device=dev)
            rate, cpu_ms, n = time_loader(make, args.epochs)
            runs[(name, workers)].append((rate, cpu_ms))
            print(f"  run {name:>14} workers={workers}: {rate:7.1f} img/s, {cpu_ms:6.1f} CPU ms/img",
                  flush=True)
        print(f"{'backend':>14} {'workers':>7} {'img/s (median)':>15} {'CPU ms/img (median)':>20}")
        for name, workers in configs:
            rates, cpus = zip(*runs[(name, workers)])
            row = {"backend": name, "workers": workers,
                   "device": device if name in ("dali", "torch-gpu") else "cpu",
                   "images_per_s": round(statistics.median(rates), 1),
                   "cpu_ms_per_image": round(statistics.median(cpus), 1),
                   "runs_images_per_s": [round(r, 1) for r in rates],
                   "runs_cpu_ms": [round(c, 1) for c in cpus]}
            rows.append(row)
            print(f"{name:>14} {workers:>7} {row['images_per_s']:>15} {row['cpu_ms_per_image']:>20}")
    cpu_rows = [r for r in rows if r["backend"] in ("torch", "dali") and r["device"] == "cpu"]
    # the CPU default: the lower CPU cost per image (wall rates on a shared machine are noisy)
    best = min(cpu_rows, key=lambda r: r["cpu_ms_per_image"])["backend"] if cpu_rows else None
    print(f"fastest CPU backend: {best}")
    path = results.write(json.dumps({
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
        "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "cuda": cuda,
        "images": args.images, "mean_kb": round(float(kb), 1), "batch_size": args.batch_size,
        "epochs": args.epochs, "repeats": args.repeats, "image_size": 448, "results": rows,
        "fastest_cpu_backend": best,
    }, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
