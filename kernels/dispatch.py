"""The one dispatch point between the SST model and its head kernels.

``backend="torch"`` runs the fused plain-PyTorch forms (kernels/torch_*.py): they use the
DESIGN identities, chunk and recompute in backward, and run on any device.
``backend="triton"`` runs the Triton kernels (kernels/triton_*.py): CUDA tensors, or any
device under ``TRITON_INTERPRET=1`` (set before triton is first imported); float32/bfloat16 only
(float64 is refused: use the torch backend for float64 checks).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton")


def default_impl() -> str:
    """What ``impl: auto`` means here: ``triton`` where training runs on a CUDA GPU, else ``fused``.

    Measured on an H100 (docs/performance.md): the chunked torch forms launch many small kernels
    and lose to the materialized reference there, while the Triton kernels match or beat it with
    a fraction of its memory; on a CPU the fused torch forms are the fastest.
    """
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu":
        return "triton"
    return "fused"


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def semantic_attention(
    U: torch.Tensor, V: torch.Tensor, a: torch.Tensor, X: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """f[b,c] = sum_s softmax_s(sum_d a_d tanh(U[b,s,d] V[c,d])) X[b,s].

    U (B,S,D), V (C,D), a (D,), X (B,S,F) -> f (B,C,F). Differentiable in all four inputs.
    """
    _check_backend(backend)
    if backend == "triton":
        from kernels.triton_decoupling import semantic_attention_triton

        return semantic_attention_triton(U, V, a, X)
    from kernels.torch_decoupling import semantic_attention_torch

    return semantic_attention_torch(U, V, a, X)


def pair_cooccurrence(
    U: torch.Tensor,
    V: torch.Tensor,
    A: torch.Tensor,
    beta: torch.Tensor,
    c: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """q[b,p] = sum_d A[p,d] relu(U[b,i_p,d] + V[b,j_p,d] + beta_d) + c_p over pairs i<j.

    Pairs in row-major upper-triangle order (torch.triu_indices(C, C, 1)).
    U, V (B,C,D), A (P,D), beta (D,), c (P,) -> q (B,P). Differentiable in all inputs.
    """
    _check_backend(backend)
    if backend == "triton":
        from kernels.triton_pairs import pair_cooccurrence_triton

        return pair_cooccurrence_triton(U, V, A, beta, c)
    from kernels.torch_pairs import pair_cooccurrence_torch

    return pair_cooccurrence_torch(U, V, A, beta, c)


def bank_pseudo_labels(
    features: torch.Tensor,
    bank: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inter-image pseudo labels against the memory bank (no gradient).

    sim[b,c] = mean_k cos(features[b,c], bank[c,k]) with empty (all-zero) slots contributing 0,
    computed as (f/|f|) . mean_k(m_k/|m_k|). Returns (sim (B,C): float32, or float64 for float64
    input on the torch backend; completed labels (B,C) same dtype as ``labels``): unknown (0)
    entries with sim >= margin become +1, others kept.
    features (B,C,F), bank (C,K,F), labels (B,C) in {-1,0,1}.
    """
    _check_backend(backend)
    if backend == "triton":
        from kernels.triton_similarity import bank_pseudo_labels_triton

        return bank_pseudo_labels_triton(features, bank, labels, margin)
    from kernels.torch_similarity import bank_pseudo_labels_torch

    return bank_pseudo_labels_torch(features, bank, labels, margin)


def class_cosine_gram(features: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Per-class cosine Gram matrix across the batch: G[c,i,j] = cos(features[i,c], features[j,c]).

    features (B,C,F) -> G (C,B,B). Differentiable in features.
    """
    _check_backend(backend)
    if backend == "triton":
        from kernels.triton_similarity import class_cosine_gram_triton

        return class_cosine_gram_triton(features)
    from kernels.torch_similarity import class_cosine_gram_torch

    return class_cosine_gram_torch(features)


def bank_update(
    bank: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """FIFO memory-bank update for all classes at once (no gradient); returns the new bank.

    new_bank[c] = concat(features[b,c] for b in batch order with labels[b,c] == 1, bank[c])[:K]
    (newest first, the reference's order). bank (C,K,F), features (B,C,F), labels (B,C).
    """
    _check_backend(backend)
    if backend == "triton":
        from kernels.triton_similarity import bank_update_triton

        return bank_update_triton(bank, features, labels)
    from kernels.torch_similarity import bank_update_torch

    return bank_update_torch(bank, features, labels)
