"""One holder at a time for a run directory or a shard split being written.

An ``flock`` on a small file, which the kernel drops when its process dies however it dies, so a
crashed holder never blocks the next; where the file system has no ``flock`` the pid and host
recorded in the file are judged instead. Releasing empties the file, or with ``remove`` deletes
it while still holding it; a process that locked a file deleted under it notices (its inode is no
longer the path's) and tries again, so two holders never lock two files of one name.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_shards.safe_io import UnsafePathError


class ExclusiveLock:
    """``acquire()`` takes the lock on ``path`` or raises ``busy(holder)``; ``holder`` is the
    holder's record ({"pid", "host", "time"}), which :func:`describe` turns into words."""

    def __init__(
        self, path: str | Path, busy: Callable[[dict[str, Any]], Exception], remove: bool = False
    ) -> None:
        self.path = Path(path)
        self._busy, self._remove = busy, remove
        self._fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                return json.loads(f.read(4096) or b"{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        while not self._try_acquire():  # the file was removed by its last holder meanwhile
            pass

    def _try_acquire(self) -> bool:
        import fcntl

        if self.path.is_symlink():
            raise UnsafePathError(f"{self.path} is a symbolic link; refusing to use it as a lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise self._busy(self._holder()) from None
            holder = self._holder()  # no flock on this file system: judge by the recorded pid
            if holder and holder.get("pid") != os.getpid() and _alive(holder):
                os.close(fd)
                raise self._busy(holder) from None
        try:
            same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (also happens when the process ends, however it ends)."""
        if self._fd is None:
            return
        try:
            if self._remove:
                self.path.unlink(missing_ok=True)  # while held: see the module doc
            else:
                os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def describe(holder: dict[str, Any]) -> str:
    """'pid 123 on host since 2026-12-06 08:00:00' of a lock holder's record."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since}"


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the recorded lock holder may still run (another host: assume it does)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True
