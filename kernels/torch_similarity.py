"""Fused PyTorch forms of SST's cross-image similarity operations.

Three operations on per-class features f (B,C,F) and the memory bank (C,K,F):

* ``bank_pseudo_labels_torch``: mean_k cos(f[b,c], bank[c,k]) through the DESIGN identity
  mean_k cos(f, m_k) = (f/|f|) . mean_k(m_k/|m_k|): one (C,F) mean of normalized bank rows and one
  dot product per (b,c) instead of B*C*K cosines. An all-zero (empty) slot normalizes to zero, so
  it contributes 0 to the mean, exactly as a cosine with a zero vector does.
* ``class_cosine_gram_torch``: per-class (B,B) cosine matrices, differentiable (contrastive loss).
* ``bank_update_torch``: the FIFO bank update for every class at once, without a loop over classes.

Cosines use cos(x, y) = x.y / (max(|x|, EPS) max(|y|, EPS)), so zero vectors give 0, not NaN.
"""

from __future__ import annotations

import torch

EPS = 1e-9


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Half/bfloat16 inputs are computed in float32; float32/float64 stay as they are."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(|x|, EPS) along the last dimension (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _check_bank_inputs(features: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be (B,C,F), got shape {tuple(features.shape)}")
    if bank.dim() != 3:
        raise ValueError(f"bank must be (C,K,F), got shape {tuple(bank.shape)}")
    B, C, F = features.shape
    if bank.shape[0] != C or bank.shape[2] != F:
        raise ValueError(
            f"bank shape {tuple(bank.shape)} does not match features {tuple(features.shape)}: "
            f"expected ({C}, K, {F})"
        )
    if tuple(labels.shape) != (B, C):
        raise ValueError(f"labels must be (B,C)=({B}, {C}), got shape {tuple(labels.shape)}")


@torch.no_grad()
def bank_pseudo_labels_torch(
    features: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sim, completed): sim[b,c] = mean_k cos(f[b,c], bank[c,k]); unknown with sim >= margin -> +1.

    sim has the features' compute dtype (float32 for half/bfloat16 inputs, float64 stays float64);
    completed has the labels' dtype. Known entries (+1/-1) are never changed.
    """
    _check_bank_inputs(features, bank, labels)
    dt = _compute_dtype(features)
    proto = normalize_rows(bank.to(dt)).mean(dim=1)  # (C,F): mean of normalized slots
    sim = torch.einsum("bcf,cf->bc", normalize_rows(features.detach().to(dt)), proto)
    completed = torch.where((labels == 0) & (sim >= margin), torch.ones_like(labels), labels)
    return sim, completed


def class_cosine_gram_torch(features: torch.Tensor) -> torch.Tensor:
    """G[c,i,j] = cos(features[i,c], features[j,c]); (B,C,F) -> (C,B,B), differentiable."""
    if features.dim() != 3:
        raise ValueError(f"features must be (B,C,F), got shape {tuple(features.shape)}")
    n = normalize_rows(features).transpose(0, 1)  # (C,B,F)
    return torch.bmm(n, n.transpose(1, 2))


@torch.no_grad()
def bank_update_torch(bank: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """new_bank[c] = cat(features[b,c] for b in batch order with labels[b,c] == 1, bank[c])[:K].

    Vectorized: each positive's slot is its rank among the class's positives in the batch (cumsum),
    old rows shift down by the class's positive count (gather), and positives are scattered in;
    positives beyond K go to a discarded overflow slot. No loop over classes, no host sync.
    """
    _check_bank_inputs(features, bank, labels)
    C, K, F = bank.shape
    pos = (labels == 1).transpose(0, 1)  # (C,B)
    rank = torch.cumsum(pos.long(), dim=1) - pos.long()  # (C,B) slot of each positive
    n_new = pos.sum(dim=1, keepdim=True)  # (C,1)
    slots = torch.arange(K, device=bank.device).unsqueeze(0)  # (1,K)
    src = (slots - n_new).clamp_min(0)  # old row that lands in each slot
    out = torch.zeros(C, K + 1, F, dtype=bank.dtype, device=bank.device)
    out[:, :K] = bank.gather(1, src.unsqueeze(-1).expand(C, K, F))
    dest = torch.where(pos & (rank < K), rank, torch.full_like(rank, K))  # (C,B); K = overflow
    vals = features.detach().transpose(0, 1).to(bank.dtype)  # (C,B,F)
    out.scatter_(1, dest.unsqueeze(-1).expand(C, dest.shape[1], F), vals)
    return out[:, :K].contiguous()
