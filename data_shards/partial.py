"""Partial labels by the literature's protocol (DESIGN §4), so results compare with published ones.

The reference draws one uniform number per (image, class) from numpy's legacy generator seeded
with ``np.random.seed(0)`` and keeps a label where the number is below the proportion. A
``RandomState(seed)`` produces the same stream without touching numpy's global state; the tests
check both against the literal recipe bit for bit.
"""

from __future__ import annotations

import numpy as np


def known_mask(shape: tuple[int, int], proportion: float, seed: int = 0) -> np.ndarray:
    """Boolean (N, C) mask of the entries that stay known for ``proportion``."""
    if not isinstance(proportion, (int, float, np.floating)) or not 0.0 < float(proportion) <= 1.0:
        raise ValueError(f"proportion must be in (0, 1], got {proportion!r}")
    if len(shape) != 2:
        raise ValueError(f"shape must be (N, C), got {shape}")
    uniform = np.random.RandomState(seed).random(shape)
    return uniform < float(proportion)


def partial_labels(labels: np.ndarray, proportion: float, seed: int = 0) -> np.ndarray:
    """int8 (N, C) labels in {+1, -1, 0}: the full ``labels`` with unknown entries set to 0."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must be a 2-D (N, C) array, got shape {arr.shape}")
    bad = ~np.isin(arr, (1, -1))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"labels must hold only +1/-1, found {arr[where]!r} at {where} (shape {arr.shape})"
        )
    known = known_mask(arr.shape, proportion, seed)
    return (arr.astype(np.int8) * known).astype(np.int8)
