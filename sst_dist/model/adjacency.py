"""Label co-occurrence adjacency for the gated GNN, built from the PARTIAL training labels."""

from __future__ import annotations

import numpy as np
import torch


def cooccurrence_adjacency(partial_labels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """M[i,j] = #(i and j both known positive) / #(i known positive), float32 (C,C).

    partial_labels (N,C) in {1 known positive, 0 unknown, -1 known negative}. A class that is never
    known positive gets an all-zero row (the reference divides by zero there and leaves NaN).
    The diagonal is 1 for every class with at least one positive, as in the reference.
    """
    y = torch.as_tensor(np.asarray(partial_labels) if not torch.is_tensor(partial_labels) else partial_labels)
    if y.dim() != 2 or y.shape[1] < 1:
        raise ValueError(f"partial_labels must be a 2-D (N,C) array, got shape {tuple(y.shape)}")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError("partial_labels contains NaN or inf")
    bad = ~((y == 1) | (y == 0) | (y == -1))
    if bad.any():
        raise ValueError(
            f"partial_labels must hold only 1, 0, -1; found e.g. {y[bad][:5].tolist()} "
            f"({int(bad.sum())} bad entries)"
        )
    pos = (y == 1).to(torch.float64)
    both = pos.t() @ pos  # (C,C) counts of joint positives
    count = both.diagonal().clone()
    M = torch.where(count[:, None] > 0, both / count.clamp(min=1)[:, None], torch.zeros_like(both))
    return M.to(torch.float32)
