"""data_shards.file_lock: one holder per lock file, even when the last holder deletes it."""

from __future__ import annotations

import fcntl
import os

import pytest

from data_shards.file_lock import ExclusiveLock


def _busy(holder: dict) -> RuntimeError:
    return RuntimeError(f"held by pid {holder.get('pid')}")


def test_a_removed_lock_file_is_not_locked_by_a_late_comer(tmp_path, monkeypatch):
    """The last holder deletes the file (remove=True) between a new comer's open and its flock:
    the new comer must not keep a lock on the deleted inode, or a third process would lock a new
    file of the same name at the same time."""
    path = tmp_path / ".x.lock"
    real_flock, calls = fcntl.flock, []

    def flock_after_the_holder_removed_it(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            path.unlink()  # the previous holder's release, right after our open
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_removed_it)
    lock = ExclusiveLock(path, _busy, remove=True)
    lock.acquire()
    assert len(calls) == 2 and path.exists()  # tried again on the file now at the path
    assert os.fstat(lock._fd).st_ino == os.stat(path).st_ino
    monkeypatch.setattr(fcntl, "flock", real_flock)
    with pytest.raises(RuntimeError, match=f"held by pid {os.getpid()}"):
        ExclusiveLock(path, _busy).acquire()
    lock.release()
    assert not path.exists()
    ExclusiveLock(path, _busy).acquire()  # free again
