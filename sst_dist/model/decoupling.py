"""Semantic decoupling: one attention-pooled feature per class (DESIGN §2.2).

``impl="reference"`` computes the literal formula (materializes (B,S,C,D) and the fc3 product);
``"fused"``/``"triton"`` use the identity score = a . tanh(U V) + k with a = W3^T w4 and call the
kernels' dispatch point. All three share the same parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kernels.dispatch import semantic_attention
from sst_dist.model.config import IMPLS


class SemanticDecoupling(nn.Module):
    """fc1: F->D (no bias), fc2: E->D (no bias), fc3: D->D, fc4: D->1, as in the reference."""

    def __init__(self, feature_dim: int, embed_dim: int, inter_dim: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(feature_dim, inter_dim, bias=False)
        self.fc2 = nn.Linear(embed_dim, inter_dim, bias=False)
        self.fc3 = nn.Linear(inter_dim, inter_dim)
        self.fc4 = nn.Linear(inter_dim, 1)

    def forward(self, X: torch.Tensor, embeddings: torch.Tensor, impl: str = "fused") -> torch.Tensor:
        """X (B,S,F), embeddings (C,E) -> class features f (B,C,F)."""
        U = self.fc1(X)  # (B,S,D)
        V = self.fc2(embeddings)  # (C,D)
        if impl == "reference":
            z = torch.tanh(U.unsqueeze(2) * V)  # (B,S,C,D)
            score = self.fc4(self.fc3(z)).squeeze(-1)  # (B,S,C)
            alpha = torch.softmax(score, dim=1)
            return torch.einsum("bsc,bsf->bcf", alpha, X)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        w4 = self.fc4.weight[0]
        a = w4 @ self.fc3.weight  # a = W3^T w4
        f = semantic_attention(U, V, a, X, backend="torch" if impl == "fused" else "triton")
        # The constant k = w4.b3 + b4 cancels in the softmax, so its true gradient is exactly zero.
        # Keeping it in the graph (times 0) gives b3/b4 zero gradients instead of None, so DDP and
        # DeepSpeed see every parameter used.
        k = w4 @ self.fc3.bias + self.fc4.bias[0]
        return f + 0.0 * k
