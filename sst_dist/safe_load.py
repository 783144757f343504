"""Loading checkpoint files without running code from them.

``torch.load`` with pickle enabled executes whatever a crafted file asks for. Everything the
project reads goes through :func:`load_tensors`: tensors and plain containers only
(``weights_only=True``). Pickle-based loading happens only when the user says they trust the
file (``--trust-checkpoint``), and the refusal is one line naming the file and the way out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds objects that only pickle can rebuild (and the user did not trust it)."""


TRUST_HINT = "pass --trust-checkpoint only if you wrote this file or trust whoever did"


def load_tensors(path: str | Path, trust: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path)`` restricted to tensors and plain containers unless ``trust``.

    Raises :class:`UnsafeCheckpointError` (one line) when the file needs pickle, and
    ``ValueError`` naming the file when it is truncated or not a torch file at all.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust:
            raise ValueError(f"{path}: not a readable checkpoint file ({_first_line(e)})") from e
        raise UnsafeCheckpointError(
            f"{path} holds objects that only pickle can load, which could run code; {TRUST_HINT}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: damaged or not a torch checkpoint ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
