"""Timed loops: data pipeline alone, model step alone on synthetic tensors, end to end; peak memory.

Throughput is measured without the profiler (its overhead would bias images/s); the
per-phase breakdown comes from a separate, shorter profiled loop. Every loop starts behind a
barrier so ranks time the same collective steps; a rank's images/s is its own batches over its
own wall time, and the run's images/s is the global batch count over the slowest rank's time.
"""

from __future__ import annotations

import itertools
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sst_dist.profiling.breakdown import phase_table
from sst_dist.profiling.ranges import PhaseRanges, phase


@dataclass
class SyntheticBatch:
    """Same fields the trainer reads from a loader batch (images, partial, full, index)."""

    images: torch.Tensor
    partial: torch.Tensor
    full: torch.Tensor
    index: torch.Tensor


def synthetic_batch(
    batch_size: int,
    num_classes: int,
    image_size: int,
    proportion: float,
    seed: int = 0,
    positive_rate: float = 0.3,
) -> SyntheticBatch:
    """Random normalized images; full labels in {+1,-1}, partial = full where known (rate ``proportion``)."""
    if batch_size < 1 or num_classes < 2 or image_size < 8:
        raise ValueError(
            f"synthetic_batch: need batch_size >= 1, num_classes >= 2, image_size >= 8; got "
            f"{batch_size}, {num_classes}, {image_size}"
        )
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    full = torch.where(torch.rand(batch_size, num_classes, generator=g) < positive_rate, 1, -1).to(torch.int8)
    known = torch.rand(batch_size, num_classes, generator=g) < proportion
    return SyntheticBatch(images, full * known.to(torch.int8), full, torch.arange(batch_size))


# ------------------------------------------------------------------ memory
def reset_peak_memory(device: torch.device) -> None:
    """Reset the peak counter: CUDA's allocator stats, or the kernel's RSS high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets VmHWM of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak since the last reset: CUDA max_memory_allocated on a GPU, peak RSS (VmHWM) on the CPU."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"kind": "rss_peak", "bytes": int(line.split()[1]) * 1024}
    except OSError:
        pass
    return {
        "kind": "rss_peak_since_start",
        "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
    }


# ------------------------------------------------------------------ loops
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def cycle_batches(loader: Any, start_epoch: int = 0) -> Iterator[Any]:
    """Endless batches, advancing the loader's epoch (and so its shuffle) at each pass."""
    for epoch in itertools.count(start_epoch):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(
                "the train loader yielded no batch (empty split or too few samples for the ranks)"
            )


def _result(images: int, seconds: float, steps: int, device: torch.device) -> dict[str, Any]:
    return {
        "steps": steps,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "peak_memory": peak_memory(device),
    }


def time_data(loader: Any, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Images/s of the loader alone (decode, augment, collate, host->device copy)."""
    it = cycle_batches(loader)
    for _ in range(warmup):
        next(it)
    reset_peak_memory(device)
    _barrier()
    images, t0 = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        images += int(batch.images.shape[0])
    _sync(device)
    return _result(images, time.perf_counter() - t0, steps, device)


def _train_mode(trainer: Any, epoch: int) -> None:
    setter = getattr(trainer, "_set_train_mode", None)
    setter() if callable(setter) else trainer.engine.train()
    trainer.sst.set_epoch(epoch)


def time_model(trainer: Any, batch: SyntheticBatch, steps: int, warmup: int, epoch: int) -> dict[str, Any]:
    """Images/s of ``trainer.train_step`` on one resident synthetic batch (no data pipeline)."""
    _train_mode(trainer, epoch)
    for _ in range(warmup):
        trainer.train_step(batch, epoch, 0.5)
    _sync(trainer.device)
    reset_peak_memory(trainer.device)
    _barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch, epoch, 0.5)
    _sync(trainer.device)
    return _result(steps * int(batch.images.shape[0]), time.perf_counter() - t0, steps, trainer.device)


def time_e2e(trainer: Any, steps: int, warmup: int, epoch: int) -> dict[str, Any]:
    """Images/s of the whole step: the train loader feeding ``trainer.train_step``."""
    _train_mode(trainer, epoch)
    it = cycle_batches(trainer.data.train_loader, epoch)
    for _ in range(warmup):
        trainer.train_step(next(it), epoch, 0.5)
    _sync(trainer.device)
    reset_peak_memory(trainer.device)
    _barrier()
    images, t0 = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        trainer.train_step(batch, epoch, 0.5)
        images += int(batch.images.shape[0])
    _sync(trainer.device)
    return _result(images, time.perf_counter() - t0, steps, trainer.device)


def profile_steps(
    trainer: Any,
    steps: int,
    epoch: int,
    trace_path: str | Path | None,
    synthetic: SyntheticBatch | None = None,
) -> dict[str, Any]:
    """Per-phase breakdown of ``steps`` end-to-end steps (or model-only ones with ``synthetic``)."""
    _train_mode(trainer, epoch)
    it = cycle_batches(trainer.data.train_loader, epoch) if synthetic is None else itertools.repeat(synthetic)
    trainer.train_step(next(it), epoch, 0.5)  # the first profiled step would otherwise carry warm-up costs
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(trainer.device)
    _barrier()
    with PhaseRanges(trainer.model, trainer.sst, trainer.engine):
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                with phase("data"):
                    batch = next(it)
                trainer.train_step(batch, epoch, 0.5)
            _sync(trainer.device)
            wall = time.perf_counter() - t0
    if trace_path is not None:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    table = phase_table(prof.events(), steps)
    return {
        "steps": steps,
        "wall_ms_per_step": wall * 1e3 / steps,
        "phases": table,
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
