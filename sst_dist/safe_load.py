"""Loading checkpoint files without running code from them.

``torch.load`` with pickle enabled executes whatever a crafted file asks for. Everything the
project reads goes through :func:`load_tensors`: tensors and plain containers only
(``weights_only=True``). Pickle-based loading happens only when the user says they trust the
file (``--trust-checkpoint``), and the refusal is one line naming the file and the way out.

Before anything is unpickled, the file's first bytes must show a ``torch.save`` file: a zip
archive (the format since torch 1.6) or a legacy save (a pickle stream opening with torch's
magic number). Anything else (a text file, an image, random bytes) is reported as not a torch
checkpoint, never handed to pickle, trusted or not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects that only pickle can rebuild (and the user did not trust it)."""


TRUST_HINT = "pass --trust-checkpoint only if you wrote this file or trust whoever did"

_ZIP_MAGIC = b"PK\x03\x04"
# a legacy torch.save file opens with pickle's PROTO opcode, then (after a FRAME header from
# protocol 4 on) the LONG1 of torch's magic number 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def torch_file_format(path: str | Path) -> str | None:
    """``"zip"`` or ``"legacy"`` for a file ``torch.save`` could have written, else None.

    Reads only the first 32 bytes; raises OSError (FileNotFoundError, IsADirectoryError...)
    when the file cannot be opened.
    """
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        return "legacy"
    return None


def load_tensors(path: str | Path, trust: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path)`` restricted to tensors and plain containers unless ``trust``.

    Raises :class:`UnsafeCheckpointError` (one line) when the file needs pickle, and
    ``ValueError`` naming the file when it is unreadable, truncated or not a torch file at all.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        kind = torch_file_format(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or _first_line(e)})") from e
    if kind is None:
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: an empty file, not a torch checkpoint")
        raise ValueError(
            f"{path}: not a torch checkpoint (neither a zip archive nor a legacy torch.save file)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if trust:
            raise ValueError(f"{path}: not a readable checkpoint file ({_first_line(e)})") from e
        raise UnsafeCheckpointError(
            f"{path} holds objects that only pickle can load, which could run code; {TRUST_HINT}"
        ) from e
    except Exception as e:  # a damaged stream fails in many ways (EOFError, IndexError, KeyError...)
        why = _first_line(e)
        why = why if why == type(e).__name__ else f"{type(e).__name__}: {why}"
        if trust and isinstance(e, (ImportError, AttributeError)):
            raise ValueError(f"{path}: its pickled objects need code that is not here ({why})") from e
        raise ValueError(f"{path}: damaged or not a torch checkpoint ({why})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
