"""File writes that never follow a planted link and never leave a half-written file.

Used for everything the project writes into run and shard directories (configs, logs, metrics,
pointer files, AP files, shard metadata). A file is written under a fresh, unpredictable
temporary name in the target's directory (``O_EXCL``: a pre-placed file or link there is never
opened) and renamed over the target; ``rename`` replaces a link itself, never what it points
to. Appends (logs, metrics) refuse a target that is a symbolic link.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafePathError(OSError):
    """A write target is a symbolic link, or a directory is not the user's own."""


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise UnsafePathError(f"{path} is a symbolic link; refusing to write through it (remove it first)")


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` all at once: temporary file in the same folder, fsync, rename.

    ``exclusive``: publish with a hard link instead of a rename, which fails if ``path`` exists
    by then (FileExistsError), so a file made meanwhile by someone else is never replaced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if exclusive and _link_no_clobber(tmp, path):
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _link_no_clobber(tmp: str, path: Path) -> bool:
    """Hard-link ``tmp`` to ``path`` (FileExistsError if taken); False where the file system has
    no hard links, after a last check that ``path`` is still free (the caller renames then)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists") from None
        return False


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644, exclusive: bool = False) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode, exclusive)


def open_append(path: str | Path):
    """Open ``path`` for appending text without following a link at its last component."""
    path = Path(path)
    _refuse_link(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:  # ELOOP: a link appeared between the check and the open
        raise UnsafePathError(f"cannot append to {path}: {e.strerror}") from e
    return os.fdopen(fd, "a", encoding="utf-8")


def ensure_own_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) or check it: a real directory owned by this user."""
    path = Path(path)
    _refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafePathError(
            f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); choose another directory"
        )
    return path
