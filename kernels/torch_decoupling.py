"""Fused PyTorch form of SST's semantic decoupling (class-specific attention pooling).

f[b,c] = sum_s softmax_s(score[b,s,c]) X[b,s] with score[b,s,c] = sum_d a_d tanh(U[b,s,d] V[c,d]).

The literal form materializes z = tanh(U V) of shape (B,S,C,D) and keeps it (and more) for
backward. Here the forward walks over chunks of classes so that only one (B,S,Cc,D) slab is alive
at a time, saves just the small inputs and the (B,S,C) attention, and the backward recomputes tanh
chunk by chunk. The backward is written by hand (see ``_SemanticAttention.backward``).
"""

from __future__ import annotations

import torch

# Elements in one (B,S,Cc,D) working slab. Small enough that a slab is a few MiB, large enough that
# the per-chunk overhead is negligible at COCO sizes (B=8,S=49,D=512 -> about 20 classes a chunk).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _class_chunk(B: int, S: int, C: int, D: int, budget: int) -> int:
    return max(1, min(C, budget // max(1, B * S * D)))


def _scores(U: torch.Tensor, V: torch.Tensor, a: torch.Tensor, chunk: int) -> torch.Tensor:
    """score (B,S,C) computed one class chunk at a time."""
    B, S, _ = U.shape
    C = V.shape[0]
    score = U.new_empty(B, S, C)
    Ue = U.unsqueeze(2)
    for c0 in range(0, C, chunk):
        c1 = min(C, c0 + chunk)
        z = Ue * V[c0:c1]  # (B,S,Cc,D)
        z.tanh_()
        score[:, :, c0:c1] = torch.matmul(z, a)
    return score


class _SemanticAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, U, V, a, X, chunk):  # type: ignore[override]
        score = _scores(U, V, a, chunk)
        alpha = torch.softmax(score, dim=1)  # over s
        f = torch.bmm(alpha.transpose(1, 2), X)  # (B,C,F)
        ctx.save_for_backward(U, V, a, X, alpha)
        ctx.chunk = chunk
        return f

    @staticmethod
    def backward(ctx, gf):  # type: ignore[override]
        U, V, a, X, alpha = ctx.saved_tensors
        need_u, need_v, need_a, need_x, _ = ctx.needs_input_grad
        gU = gV = ga = gX = None
        gf = gf.contiguous()
        if need_x:
            gX = torch.bmm(alpha, gf)  # dX[b,s] = sum_c alpha[b,s,c] gf[b,c]
        if need_u or need_v or need_a:
            # softmax backward over s: gscore = alpha * (galpha - sum_s alpha galpha)
            galpha = torch.bmm(X, gf.transpose(1, 2))  # (B,S,C)
            gscore = alpha * (galpha - (alpha * galpha).sum(dim=1, keepdim=True))
            B, S, D = U.shape
            C = V.shape[0]
            gU = torch.zeros_like(U) if need_u else None
            gV = torch.empty_like(V) if need_v else None
            ga = torch.zeros_like(a) if need_a else None
            Ue = U.unsqueeze(2)
            for c0 in range(0, C, ctx.chunk):
                c1 = min(C, c0 + ctx.chunk)
                gs = gscore[:, :, c0:c1]  # (B,S,Cc)
                t = Ue * V[c0:c1]
                t.tanh_()  # recomputed z, (B,S,Cc,D)
                if need_a:
                    ga += gs.reshape(1, -1).matmul(t.reshape(-1, D)).squeeze(0)
                if need_u or need_v:
                    # d score / d pre = a_d (1 - tanh^2); reuse t's storage for the gradient
                    t.square_().neg_().add_(1).mul_(gs.unsqueeze(-1)).mul_(a)
                    if need_u:
                        gU += (t * V[c0:c1]).sum(dim=2)
                    if need_v:
                        gV[c0:c1] = t.mul_(Ue).sum(dim=(0, 1))
        return gU, gV, ga, gX, None


def semantic_attention_torch(
    U: torch.Tensor,
    V: torch.Tensor,
    a: torch.Tensor,
    X: torch.Tensor,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Class-specific attention pooling without materializing (B,S,C,D); see module docstring.

    U (B,S,D), V (C,D), a (D,), X (B,S,F) -> f (B,C,F).
    """
    if U.dim() != 3 or V.dim() != 2 or a.dim() != 1 or X.dim() != 3:
        raise ValueError(
            "semantic_attention: expected U (B,S,D), V (C,D), a (D,), X (B,S,F); got "
            f"U {tuple(U.shape)}, V {tuple(V.shape)}, a {tuple(a.shape)}, X {tuple(X.shape)}"
        )
    B, S, D = U.shape
    if V.shape[1] != D or a.shape[0] != D or X.shape[:2] != (B, S):
        raise ValueError(
            "semantic_attention: shape mismatch: "
            f"U {tuple(U.shape)}, V {tuple(V.shape)}, a {tuple(a.shape)}, X {tuple(X.shape)}"
        )
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    chunk = _class_chunk(B, S, V.shape[0], D, chunk_elements)
    return _SemanticAttention.apply(U.contiguous(), V.contiguous(), a.contiguous(), X.contiguous(), chunk)
