"""Gated graph neural network over the C class nodes (DESIGN §2.3).

Each of the T steps aggregates m = [A_in h ; A_out h] with two batched matmuls over all nodes and
images at once, then applies a GRU-style update. A_in = M, A_out = M^T (the co-occurrence matrix).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class GatedGNN(nn.Module):
    """z = sig(Wz m + Uz h), r = sig(Wr m + Ur h), h~ = tanh(Wh m + Uh (r*h)), h = (1-z) h + z h~."""

    def __init__(self, dim: int, time_steps: int = 3) -> None:
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be >= 1, got {time_steps}")
        self.time_steps = time_steps
        self.w_z, self.u_z = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)
        self.w_r, self.u_r = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)
        self.w_h, self.u_h = nn.Linear(2 * dim, dim), nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, adj_in: torch.Tensor, adj_out: torch.Tensor) -> torch.Tensor:
        """h (B,C,F) initial node states, adj_in/adj_out (C,C) -> final node states (B,C,F)."""
        for _ in range(self.time_steps):
            m = torch.cat((torch.matmul(adj_in, h), torch.matmul(adj_out, h)), dim=-1)  # (B,C,2F)
            z = torch.sigmoid(self.w_z(m) + self.u_z(h))
            r = torch.sigmoid(self.w_r(m) + self.u_r(h))
            h_new = torch.tanh(self.w_h(m) + self.u_h(r * h))
            h = h + z * (h_new - h)  # (1-z) h + z h~; promotes mixed dtypes under autocast
        return h
