"""Distributed probe: prove a launcher's rendezvous works before spending time on training.

Run it under any of our launchers (deepspeed.sh, torchrun.sh, slurm/train.sbatch via
``SST_ENTRY=probe``). Every rank joins the process group from the launcher's environment,
all-reduces a tensor, prints one line and writes ``rank<R>.json`` with what it saw, so a test
can check that the world size, ranks and sum are right without parsing logs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

# SLURM sets its own names; launchers (torchrun, deepspeed) set the torch.distributed ones.
_SLURM_FALLBACK = {
    "RANK": "SLURM_PROCID",
    "WORLD_SIZE": "SLURM_NTASKS",
    "LOCAL_RANK": "SLURM_LOCALID",
}


def dist_env() -> dict[str, str]:
    """The rendezvous variables, filled from SLURM's when a launcher did not set them."""
    env = {}
    for key, slurm_key in _SLURM_FALLBACK.items():
        value = os.environ.get(key) or os.environ.get(slurm_key)
        if value is None:
            raise SystemExit(
                f"probe: environment variable {key} (or {slurm_key}) is not set; run the probe "
                "under torchrun, deepspeed or srun"
            )
        env[key] = value
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise SystemExit(f"probe: environment variable {key} is not set")
        env[key] = os.environ[key]
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for rank<R>.json")
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                        help="process-group backend (auto: nccl with CUDA, else gloo)")
    parser.add_argument("--timeout", type=float, default=120.0, help="rendezvous timeout (s)")
    args = parser.parse_args(argv)

    import datetime

    import torch
    import torch.distributed as dist

    env = dist_env()
    os.environ.update(env)  # init_process_group(env://) reads them from os.environ
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    backend = args.backend if args.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    from sst_dist.train.distributed import detect_env
    from sst_dist.train.rendezvous import LOOPBACK, make_store, pin_to_loopback

    # the trainer's rendezvous (loopback-only store on one node), so the probe proves that path
    single = detect_env().single_node
    master = LOOPBACK if single else env["MASTER_ADDR"]
    if single:
        pin_to_loopback(os.environ)
    timeout = datetime.timedelta(seconds=args.timeout)
    start = time.perf_counter()
    store = make_store(rank, world, master, int(env["MASTER_PORT"]), single, timeout)
    if store is None:  # torchrun: its agent hosts the store
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    value = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(value)
    gathered = [None] * world
    dist.all_gather_object(gathered, socket.gethostname())
    elapsed = time.perf_counter() - start

    result = {
        "rank": rank, "world_size": world, "local_rank": local_rank,
        "host": socket.gethostname(), "pid": os.getpid(), "backend": backend,
        "master": f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
        "allreduce_sum": float(value.item()), "expected_sum": world * (world + 1) / 2,
        "hosts": gathered, "seconds": round(elapsed, 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    print(f"probe rank {rank}/{world} local {local_rank} host {result['host']} "
          f"sum {result['allreduce_sum']:g} (expected {result['expected_sum']:g})", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if result["allreduce_sum"] == result["expected_sum"] else 1


if __name__ == "__main__":
    sys.exit(main())
