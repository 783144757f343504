"""Fused PyTorch form of SST's intra-image pair co-occurrence head.

q[b,p] = sum_d A[p,d] relu(U[b,i_p,d] + V[b,j_p,d] + beta_d) + c_p over the class pairs i_p < j_p in
row-major upper-triangle order (``torch.triu_indices(C, C, 1)``).

The literal head materializes two (B,P,D) tensors and keeps them for backward. Here the pair
triangle is cut into blocks of rows i; a block is the dense rectangle (rows, columns j, B, D) built
by one broadcast add (no gathers), its contraction with A is one batched matmul, and the gradients
for U and V are plain sums over the block's columns and rows (no scatter). Only the small inputs
are saved; the backward recomputes the relu block by block.
"""

from __future__ import annotations

import functools

import torch

from kernels._autocast import float32_outside_cuda_autocast

# Elements in one (rows, cols, B, D) working block (COCO, B=8, D=1024: about 500 pairs a block).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def pair_indices(C: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) of every pair i<j in row-major upper-triangle order; P = C(C-1)/2 each."""
    ij = torch.triu_indices(C, C, 1, device=device)
    return ij[0], ij[1]


@functools.lru_cache(maxsize=64)
def _row_blocks(C: int, per_row_elements: int, budget: int) -> tuple[tuple[int, int, int, int], ...]:
    """Split the rows i of the pair triangle into blocks (i0, i1, first pair, end pair).

    Block [i0, i1) covers the rectangle rows i0..i1-1 x columns i0+1..C-1, whose upper triangle
    (column >= row, counted from the block's corner) holds exactly the pairs with i in [i0, i1),
    in row-major order. Blocks hold at most ``budget`` elements (at least one row each) and at
    most half as many rows as columns, which keeps the wasted lower corner small.
    """
    blocks, i0, p0 = [], 0, 0
    while i0 < C - 1:
        cols = C - 1 - i0
        rows = max(1, min(C - 1 - i0, budget // max(1, cols * per_row_elements), max(1, cols // 2)))
        i1 = i0 + rows
        p1 = p0 + sum(C - 1 - i for i in range(i0, i1))
        blocks.append((i0, i1, p0, p1))
        p0, i0 = p1, i1
    return tuple(blocks)


def _block(Ut, Vt, i0, i1):
    """relu(U_i + beta + V_j) for rows i0..i1-1, columns i0+1..C-1, laid out (rows, cols, B, D)."""
    return (Ut[i0:i1, None] + Vt[None, i0 + 1 :]).clamp_(min=0)


def _valid(i0, i1, C, device):
    """(rows, cols) of the block's upper triangle, row-major: integer indices, not a boolean mask,
    whose indexing would need a nonzero (a host synchronisation on a GPU)."""
    return tuple(torch.triu_indices(i1 - i0, C - 1 - i0, 0, device=device))


class _PairCooccurrence(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # float32 under autocast
    def forward(ctx, U, V, A, beta, c, budget):  # type: ignore[override]
        B, C, D = U.shape
        P = A.shape[0]
        Ut = (U + beta).transpose(0, 1).contiguous()  # (C,B,D), beta folded into the i side
        Vt = V.transpose(0, 1).contiguous()
        q = U.new_empty(P, B)
        for i0, i1, p0, p1 in _row_blocks(C, B * D, budget):
            valid = _valid(i0, i1, C, U.device)
            h = _block(Ut, Vt, i0, i1)  # (r, J, B, D)
            r, J = h.shape[:2]
            Ab = A.new_zeros(r, J, D)
            Ab[valid] = A[p0:p1]
            qb = torch.bmm(h.view(r * J, B, D), Ab.view(r * J, D, 1)).view(r, J, B)
            q[p0:p1] = qb[valid]
        q += c.unsqueeze(1)
        ctx.save_for_backward(Ut, Vt, A)
        ctx.budget = budget
        return q.t().contiguous()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gq):  # type: ignore[override]
        Ut, Vt, A = ctx.saved_tensors
        need_u, need_v, need_a, need_beta, need_c, _ = ctx.needs_input_grad
        C, B, D = Ut.shape
        gqt = gq.t().contiguous()  # (P,B)
        gA = torch.empty_like(A) if need_a else None
        gc = gqt.sum(dim=1) if need_c else None
        need_uv = need_u or need_v or need_beta
        gUt = torch.zeros_like(Ut) if need_uv else None
        gVt = torch.zeros_like(Vt) if need_v else None
        if need_a or need_uv:
            for i0, i1, p0, p1 in _row_blocks(C, B * D, ctx.budget):
                valid = _valid(i0, i1, C, Ut.device)
                h = _block(Ut, Vt, i0, i1)  # recomputed, (r, J, B, D)
                r, J = h.shape[:2]
                gb = gqt.new_zeros(r, J, B)  # zero outside the triangle: no contribution there
                gb[valid] = gqt[p0:p1]
                if need_a:
                    gAb = torch.bmm(gb.view(r * J, 1, B), h.view(r * J, B, D)).view(r, J, D)
                    gA[p0:p1] = gAb[valid]
                if need_uv:
                    Ab = A.new_zeros(r, J, D)
                    Ab[valid] = A[p0:p1]
                    # d/dpre = gq A [pre > 0]: sign(relu) is the relu derivative (0 at 0, as torch)
                    g = h.sign_().mul_(gb.unsqueeze(-1)).mul_(Ab.unsqueeze(2))
                    gUt[i0:i1] += g.sum(dim=1)
                    if need_v:
                        gVt[i0 + 1 :] += g.sum(dim=0)
        gbeta = gUt.sum(dim=(0, 1)) if need_beta else None  # every pair adds its gradient to one U row
        gU = gUt.transpose(0, 1) if need_u else None
        gV = gVt.transpose(0, 1) if need_v else None
        return gU, gV, gA, gbeta, gc, None


def pair_cooccurrence_torch(
    U: torch.Tensor,
    V: torch.Tensor,
    A: torch.Tensor,
    beta: torch.Tensor,
    c: torch.Tensor,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Pair logits without materializing (B,P,D); see module docstring.

    U, V (B,C,D), A (P,D), beta (D,), c (P,) -> q (B,P).
    """
    if U.dim() != 3 or V.shape != U.shape:
        raise ValueError(
            f"pair_cooccurrence: U and V must both be (B,C,D); got U {tuple(U.shape)}, V {tuple(V.shape)}"
        )
    B, C, D = U.shape
    P = C * (C - 1) // 2
    if A.shape != (P, D) or beta.shape != (D,) or c.shape != (P,):
        raise ValueError(
            f"pair_cooccurrence: for C={C}, D={D} expected A ({P},{D}), beta ({D},), c ({P},); got "
            f"A {tuple(A.shape)}, beta {tuple(beta.shape)}, c {tuple(c.shape)}"
        )
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    dtype = functools.reduce(torch.promote_types, (U.dtype, V.dtype, A.dtype, beta.dtype, c.dtype))
    U, V, A, beta, c = (t.to(dtype) for t in (U, V, A, beta, c))
    with float32_outside_cuda_autocast(U) as cast:
        U, V, A, beta, c = cast(U, V, A, beta, c)
        return _PairCooccurrence.apply(U, V, A.contiguous(), beta, c, chunk_elements)
