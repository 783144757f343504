"""Where the rendezvous store listens: nowhere at world size 1, loopback on one node.

torch's ``env://`` rendezvous makes rank 0 start a TCPStore that listens on every interface,
although the store is unauthenticated and object collectives unpickle what they receive. So we
build the store ourselves: world size 1 uses an in-process HashStore (no socket at all); a
single-node run binds rank 0's listening socket to 127.0.0.1 and hands it to the TCPStore
(``master_listen_fd``); a multi-node run binds to the address of MASTER_ADDR, the one
interface the other nodes use (README "Trust model": multi-node runs need a trusted network).
Single-node runs also pin gloo's and NCCL's own sockets to the loopback interface.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping, MutableMapping

import torch.distributed as dist

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def is_single_node(env: Mapping[str, str], world_size: int, master_addr: str) -> bool:
    """Whether every rank runs on this machine, from what the launcher exported.

    torchrun: LOCAL_WORLD_SIZE; deepspeed: LOCAL_SIZE / CROSS_SIZE; srun: SLURM_STEP_NUM_NODES /
    SLURM_NNODES. Without any of them, a loopback MASTER_ADDR can only be reached locally."""
    if world_size <= 1:
        return True
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key]) == world_size
    for key in ("CROSS_SIZE", "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        if env.get(key, "").isdigit():
            return int(env[key]) == 1
    return is_loopback(master_addr)


def pin_to_loopback(environ: MutableMapping[str, str]) -> None:
    """Make gloo and NCCL open their sockets on the loopback interface (unless the user chose)."""
    names = {name for _, name in socket.if_nameindex()}
    if "lo" in names:
        environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def _listening_socket(host: str, port: int) -> socket.socket | None:
    """A socket listening on ``host:port`` only; None when ``host`` is not an address of this
    machine (e.g. a name that maps to a NAT address), so the caller falls back."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        if exc.errno == 99:  # EADDRNOTAVAIL: not one of our addresses
            return None
        raise OSError(f"rendezvous: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def make_store(
    rank: int, world_size: int, master_addr: str, master_port: int, single_node: bool,
    timeout: datetime.timedelta,
) -> dist.Store | None:
    """The process group's store, listening only where the other ranks need it.

    None means "let torch's env:// connect": under torchrun the agent already hosts the store
    (TORCHELASTIC_USE_AGENT_STORE) and the ranks only connect to it."""
    if world_size == 1:
        return dist.HashStore()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    host = LOOPBACK if single_node else master_addr
    if rank != 0:
        return dist.TCPStore(host, master_port, world_size, False, timeout)
    sock = _listening_socket(host, master_port)
    if sock is None:
        print(
            f"rendezvous: {master_addr} is not an address of this host; the store listens on "
            "every interface (multi-node runs need a trusted network)",
            file=sys.stderr,
        )
        return dist.TCPStore(host, master_port, world_size, True, timeout)
    port = sock.getsockname()[1]
    return dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=sock.detach())
