"""Intra-image pair co-occurrence head (DESIGN §2.5) and the per-row linear layer it ends with.

``impl="reference"`` is literal: it gathers [g_i ; g_j] for every pair i<j and runs fc2, relu, fc3
and the per-pair classifier over (B,P,D) tensors. ``"fused"``/``"triton"`` fold fc3 into the
per-pair weights once per step (A = Wpairs W3'), split fc2 into its g_i and g_j halves, and call
the kernels' dispatch point, which never holds (B,P,D) whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kernels.dispatch import pair_cooccurrence

IMPLS = ("reference", "fused", "triton")


class ElementwiseLinear(nn.Module):
    """One weight vector and bias per row: out[b,n] = w_n . x[b,n] + beta_n (the reference's
    Element_Wise_Layer); used for the per-class and the per-pair classifiers."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.bias = nn.Parameter(torch.empty(rows))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., rows, dim) -> (..., rows)."""
        return (x * self.weight).sum(dim=-1) + self.bias


class PairHead(nn.Module):
    """fc1: F->H, fc2: 2H->D, fc3: D->D, classifier: P per-pair vectors of D (+ bias)."""

    def __init__(self, num_classes: int, feature_dim: int, inter_dim: int = 512, out_dim: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.inter_dim = inter_dim
        self.num_pairs = num_classes * (num_classes - 1) // 2
        self.fc1 = nn.Linear(feature_dim, inter_dim)
        self.fc2 = nn.Linear(2 * inter_dim, out_dim)
        self.fc3 = nn.Linear(out_dim, out_dim)
        self.classifier = ElementwiseLinear(self.num_pairs, out_dim)
        ij = torch.triu_indices(num_classes, num_classes, 1)
        self.register_buffer("pair_i", ij[0], persistent=False)
        self.register_buffer("pair_j", ij[1], persistent=False)

    def forward(self, f: torch.Tensor, impl: str = "fused") -> torch.Tensor:
        """Class features f (B,C,F) -> pair logits q (B,P), pairs in row-major i<j order."""
        g = self.fc1(f)  # (B,C,H)
        if impl == "reference":
            pairs = torch.cat((g[:, self.pair_i], g[:, self.pair_j]), dim=-1)  # (B,P,2H)
            return self.classifier(self.fc3(torch.relu(self.fc2(pairs))))
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        H = self.inter_dim
        W2 = self.fc2.weight  # (D, 2H): columns [:H] act on g_i, [H:] on g_j
        U = torch.matmul(g, W2[:, :H].t())  # (B,C,D)
        V = torch.matmul(g, W2[:, H:].t())
        Wp = self.classifier.weight  # (P, D)
        A = Wp @ self.fc3.weight  # A_p = W3'^T w_p, (P, D)
        c = Wp @ self.fc3.bias + self.classifier.bias  # (P,)
        return pair_cooccurrence(U, V, A, self.fc2.bias, c, backend="torch" if impl == "fused" else "triton")
