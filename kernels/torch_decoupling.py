"""Fused PyTorch form of SST's semantic decoupling (class-specific attention pooling).

f[b,c] = sum_s softmax_s(score[b,s,c]) X[b,s] with score[b,s,c] = sum_d a_d tanh(U[b,s,d] V[c,d]).

The literal form materializes z = tanh(U V) of shape (B,S,C,D) and keeps it (and more) for
backward. Here the forward walks over chunks of classes so that only one (D,B*S,Cc) slab is alive
at a time, saves just the small inputs and the (B,S,C) attention, and the backward recomputes tanh
chunk by chunk. The backward is written by hand (see ``_SemanticAttention.backward``).
"""

from __future__ import annotations

import functools

import torch

from kernels._autocast import float32_outside_cuda_autocast

# Elements in one (D,B*S,Cc) working slab. Small enough that a slab is a few MiB, large enough that
# the per-chunk overhead is negligible at COCO sizes (B=8,S=49,D=512 -> about 20 classes a chunk).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _class_chunk(B: int, S: int, C: int, D: int, budget: int) -> int:
    return max(1, min(C, budget // max(1, B * S * D)))


# Layout: the working slab is (D, B*S, Cc), so every reduction it feeds (the score contraction
# with a, and the gradients for a, U and V) is one matrix or batched matrix-vector product reading
# the slab once, instead of an elementwise product followed by a sum.


def _tanh_slab(Ut: torch.Tensor, Vt: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """z[d, n, c] = tanh(Ut[d, n] * Vt[d, c]) for classes c0..c1, shape (D, N=B*S, Cc)."""
    z = Ut.unsqueeze(2) * Vt[:, None, c0:c1]
    return z.tanh_()


class _SemanticAttention(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # float32 under autocast
    def forward(ctx, U, V, a, X, chunk):  # type: ignore[override]
        B, S, D = U.shape
        C = V.shape[0]
        Ut = U.reshape(B * S, D).t().contiguous()  # (D, N)
        Vt = V.t().contiguous()  # (D, C)
        score = U.new_empty(B * S, C)
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            z = _tanh_slab(Ut, Vt, c0, c1)
            score[:, c0:c1] = torch.mm(a.unsqueeze(0), z.view(D, -1)).view(B * S, c1 - c0)
        alpha = torch.softmax(score.view(B, S, C), dim=1)  # over s
        f = torch.bmm(alpha.transpose(1, 2), X)  # (B,C,F)
        ctx.save_for_backward(Ut, Vt, a, X, alpha)
        ctx.chunk = chunk
        return f

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gf):  # type: ignore[override]
        Ut, Vt, a, X, alpha = ctx.saved_tensors
        need_u, need_v, need_a, need_x, _ = ctx.needs_input_grad
        gU = gV = ga = gX = None
        gf = gf.contiguous()
        if need_x:
            gX = torch.bmm(alpha, gf)  # dX[b,s] = sum_c alpha[b,s,c] gf[b,c]
        if need_u or need_v or need_a:
            B, S, C = alpha.shape
            D, N = Ut.shape
            # softmax backward over s: gscore = alpha * (galpha - sum_s alpha galpha)
            galpha = torch.bmm(X, gf.transpose(1, 2))  # (B,S,C)
            gscore = (alpha * (galpha - (alpha * galpha).sum(dim=1, keepdim=True))).reshape(N, C)
            gUt = torch.zeros_like(Ut) if need_u else None  # (D, N)
            gVt = torch.empty_like(Vt) if need_v else None  # (D, C)
            ga = torch.zeros_like(a) if need_a else None
            for c0 in range(0, C, ctx.chunk):
                c1 = min(C, c0 + ctx.chunk)
                gs = gscore[:, c0:c1]  # (N, Cc)
                t = _tanh_slab(Ut, Vt, c0, c1)  # recomputed z, (D, N, Cc)
                if need_a:
                    ga += torch.mv(t.view(D, -1), gs.reshape(-1))
                if need_u or need_v:
                    # d score / d pre = a_d (1 - t^2); a_d is applied after the reductions.
                    # w = (t^2 - 1) * gs = -(1 - t^2) gs, reusing t's storage; the sign goes with a.
                    w = t.mul_(t).sub_(1).mul_(gs)
                    if need_u:
                        gUt += torch.bmm(w, Vt[:, c0:c1].unsqueeze(2)).squeeze(2)
                    if need_v:
                        gVt[:, c0:c1] = torch.bmm(Ut.unsqueeze(1), w).squeeze(1)
            neg_a = -a.unsqueeze(1)
            if need_u:
                gU = (gUt * neg_a).t().reshape(B, S, D)
            if need_v:
                gV = (gVt * neg_a).t()
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
    dtype = functools.reduce(torch.promote_types, (U.dtype, V.dtype, a.dtype, X.dtype))  # e.g. autocast
    U, V, a, X = (t.to(dtype).contiguous() for t in (U, V, a, X))
    with float32_outside_cuda_autocast(U) as cast:
        return _SemanticAttention.apply(*cast(U, V, a, X), chunk)
