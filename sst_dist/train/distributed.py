"""Process-group setup for every launcher, collective helpers, and batch-norm synchronization.

One code path serves the deepspeed launcher and torchrun (both export RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_*), SLURM's srun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the master is
the first host of SLURM_NODELIST) and a plain single process (world 1 on 127.0.0.1).

Batch norm: ``torch.nn.SyncBatchNorm`` only accepts CUDA tensors. On the CPU with world > 1,
:class:`AllReduceBatchNorm` synchronizes the batch statistics itself: each rank computes
per-channel (count, sum, sum of squares), one differentiable all-reduce sums them, and the
normalization uses the global-batch mean and (biased) variance. The all-reduce's backward is
again an all-reduce of the gradients, so the sum over ranks of local gradients equals the
gradient of the global batch: training is world-size invariant, which the tests check.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sst_dist.train.rendezvous import LOOPBACK, is_single_node, make_store, pin_to_loopback


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    single_node: bool = True  # every rank on this machine: the store listens on loopback only


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist: scontrol when present, else parse ``a[01-04,7],b``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank/world/master from the launcher's environment variables (see module doc)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 29500))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1"))
        job = int(env.get("SLURM_JOB_ID", 0) or 0)
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))
    else:
        launcher, rank, world, local = "single", 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", 0) or 0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world} (launcher {launcher})")
    return DistEnv(rank, world, local, addr, port, launcher, is_single_node(env, world, addr))


def _skip_shm_op_unless_asked() -> None:
    """Do not JIT-load DeepSpeed's CPU shared-memory op unless ``SST_DS_SHM=1``.

    DeepSpeed builds/loads it in every process group init, under a file lock shared by every
    process on the machine (minutes when a rebuild is triggered), but uses it only for
    ``inference_all_reduce``, which training never calls; gradients go through torch.distributed.
    """
    if os.environ.get("SST_DS_SHM", "0") == "1":
        return
    import importlib
    import sys

    try:
        importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    # sys.modules, not attribute access: deepspeed.comm.torch as an attribute is the torch package
    ds_torch = sys.modules["deepspeed.comm.torch"]
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def share_cpu_threads(environ: dict[str, str] | None = None) -> int:
    """Give each rank on this node its share of the cores, unless OMP_NUM_THREADS says otherwise.

    Several ranks each running torch's default (all cores) oversubscribe the CPU; on a 2-core
    machine that was measured 12x slower than one thread per rank. Returns the thread count set.
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    local = next((int(env[k]) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
                  if env.get(k, "").isdigit()), 1)
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, local))
    torch.set_num_threads(threads)
    return threads


def init_distributed(backend: str | None = None, timeout_s: int = 600) -> DistEnv:
    """Export the detected env as torch's variables and start the process group via DeepSpeed."""
    import datetime

    import deepspeed

    env = detect_env()
    port = env.master_port or _free_port()
    addr = LOOPBACK if env.single_node else env.master_addr
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=addr,
        MASTER_PORT=str(port),
    )
    if not dist.is_initialized():
        _skip_shm_op_unless_asked()
        if backend is None:
            backend = "nccl" if local_device().type == "cuda" else "gloo"
        if env.single_node:
            pin_to_loopback(os.environ)
        timeout = datetime.timedelta(seconds=timeout_s)
        # our own store first (rendezvous.py: loopback on one node, none at world size 1);
        # DeepSpeed then adopts the initialized process group
        store = make_store(env.rank, env.world_size, addr, port, env.single_node, timeout)
        if store is not None:
            dist.init_process_group(
                backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
            )
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        atexit.register(_shut_down_process_group)
    return DistEnv(env.rank, env.world_size, env.local_rank, addr, port, env.launcher, env.single_node)


def _shut_down_process_group() -> None:
    """At exit, before the interpreter tears down: a process group left to static destruction
    once aborted a finished rank ('terminate called without an active exception', exit -6)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> torch.device:
    """This rank's device: its GPU (made current) unless there is none or DS_ACCELERATOR=cpu."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, no gradient (counts, denominators, statistics)."""
    t = t.detach().clone()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: backward sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_sum_grad(t: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(t) if world_size() > 1 else t


def all_gather_rows(t: torch.Tensor, keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (= global batch order).

    Ranks may hold different row counts. With ``keep_local_grad`` this rank's rows are the
    original tensor (gradient flows to them); the other ranks' rows are constants.
    """
    if world_size() == 1:
        return t if keep_local_grad else t.detach()
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    top = max(counts)
    pad = t.detach()
    if t.shape[0] < top:
        pad = torch.cat([pad, pad.new_zeros((top - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(pad) for _ in counts]
    dist.all_gather(parts, pad.contiguous())
    rows = [p[:c] for p, c in zip(parts, counts)]
    if keep_local_grad:
        rows[rank()] = t
    return torch.cat(rows)


def gather_object_list(obj: object) -> list[object]:
    """All ranks' Python objects, in rank order (small metadata only)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class AllReduceBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the global batch (CPU-friendly sync).

    Eval mode is exactly ``nn.BatchNorm2d``. Training mode takes the same path on any world size
    (a world of one just skips the all-reduce): with torch's own kernel at world 1, the float32
    rounding differs from world 2's, and a ReLU whose input lands within that rounding of 0
    flips, changing a gradient by percents (seen with layer4's BatchNorms training). Running
    statistics are updated with the global mean and the unbiased global variance, like
    SyncBatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"AllReduceBatchNorm expects NCHW input, got shape {tuple(x.shape)}")
        c = x.shape[1]
        xf = x.float()
        xd = x.double()  # float64 sums: E[x^2] - E[x]^2 in float32 loses digits when |mean| >> std
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float64, device=x.device)
        stats = torch.cat([count, xd.sum(dim=(0, 2, 3)), (xd * xd).sum(dim=(0, 2, 3))])
        stats = all_reduce_sum_grad(stats)
        n = stats[0]
        mean64 = stats[1 : 1 + c] / n
        var64 = (stats[1 + c :] / n - mean64 * mean64).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var64.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(mean64.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        mean, var = mean64.float(), var64.float()
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, mode: str) -> nn.Module:
    """Apply the run's batch-norm policy to every BatchNorm2d that has trainable parameters.

    ``sync``: SyncBatchNorm on CUDA, :class:`AllReduceBatchNorm` on the CPU. ``frozen``: keep
    every BN in eval mode (running statistics; see :func:`freeze_batchnorm_stats`). ``local``:
    per-rank statistics (not world-size invariant). BNs frozen by the freeze policy (no
    trainable parameter) stay plain: they run in eval mode anyway.
    """
    if mode not in ("sync", "frozen", "local"):
        raise ValueError(f"batchnorm mode must be sync|frozen|local, got {mode!r}")
    if mode != "sync":
        return module
    use_cuda = any(p.is_cuda for p in module.parameters())
    if use_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        trainable = any(p.requires_grad for p in child.parameters(recurse=False))
        if type(child) is nn.BatchNorm2d and trainable:
            new = AllReduceBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, mode)
    return module


def freeze_batchnorm_stats(module: nn.Module) -> None:
    """Put every batch norm in eval mode (called after ``model.train()`` for mode ``frozen``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
