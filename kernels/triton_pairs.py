"""Triton intra-image pair co-occurrence head (DESIGN §2.5 identity).

q[b,p] = sum_d A[p,d] relu(U[b,i_p,d] + V[b,j_p,d] + beta_d) + c_p over the pairs i<j in
row-major upper-triangle order (torch.triu_indices(C, C, 1)). The (B,P,D) hidden tensor is
never stored: forward and backward rebuild relu tiles in registers.

Layers: ``@triton.jit`` kernels -> ``_launch_*`` launchers -> ``torch.library`` custom ops with
fake impls and registered autograd -> :func:`pair_cooccurrence_triton`. Float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_common import check_float, kernel, result_dtype, same_device

_BP, _BD, _BK = 32, 64, 16  # tiles: pairs, inner dim, partner classes


@triton.jit
def _fwd_kernel(U, V, A, BETA, CB, I, J, Q, C, P, D, BP: tl.constexpr, BD: tl.constexpr):
    op = tl.program_id(0) * BP + tl.arange(0, BP)
    b = tl.program_id(1).to(tl.int64)
    mp = op < P
    i = tl.load(I + op, mask=mp, other=0)
    j = tl.load(J + op, mask=mp, other=0)
    acc = tl.zeros((BP,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        od = d0 + tl.arange(0, BD)
        md = od < D
        m2 = mp[:, None] & md[None, :]
        u = tl.load(U + b * C * D + i[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        v = tl.load(V + b * C * D + j[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        be = tl.load(BETA + od, mask=md, other=0.0).to(tl.float32)
        w = tl.load(A + op[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(w * tl.maximum(u + v + be[None, :], 0.0), axis=1)
    acc += tl.load(CB + op, mask=mp, other=0.0).to(tl.float32)
    tl.store(Q + b * P + op, acc, mask=mp)


@triton.jit
def _da_kernel(U, V, BETA, I, J, DQ, DA, B, C, P, D, BP: tl.constexpr, BD: tl.constexpr):
    """dA[p,d] = sum_b dq[b,p] relu(h[b,p,d]); one program owns a tile (deterministic)."""
    op = tl.program_id(0) * BP + tl.arange(0, BP)
    od = tl.program_id(1) * BD + tl.arange(0, BD)
    mp, md = op < P, od < D
    m2 = mp[:, None] & md[None, :]
    i = tl.load(I + op, mask=mp, other=0)
    j = tl.load(J + op, mask=mp, other=0)
    be = tl.load(BETA + od, mask=md, other=0.0).to(tl.float32)
    acc = tl.zeros((BP, BD), dtype=tl.float32)
    for b in range(0, B):  # b * C * D stays below 2**31 while U has fewer elements
        u = tl.load(U + b * C * D + i[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        v = tl.load(V + b * C * D + j[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        g = tl.load(DQ + b * P + op, mask=mp, other=0.0).to(tl.float32)
        acc += g[:, None] * tl.maximum(u + v + be[None, :], 0.0)
    tl.store(DA + op[:, None] * D + od[None, :], acc, mask=m2)


@triton.jit
def _duv_kernel(U, V, A, BETA, DQ, DU, DV, C, P, D, BK: tl.constexpr, BD: tl.constexpr):
    """dU[b,c] sums over pairs (c,k>c); dV[b,c] over pairs (k<c,c); pair index from (i,j)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    od = tl.program_id(2) * BD + tl.arange(0, BD)
    md = od < D
    base = b * C * D
    uc = tl.load(U + base + c * D + od, mask=md, other=0.0).to(tl.float32)
    vc = tl.load(V + base + c * D + od, mask=md, other=0.0).to(tl.float32)
    be = tl.load(BETA + od, mask=md, other=0.0).to(tl.float32)
    acc_u = tl.zeros((BD,), dtype=tl.float32)
    acc_v = tl.zeros((BD,), dtype=tl.float32)
    for k0 in range(0, C, BK):
        ok = k0 + tl.arange(0, BK)
        mk = ok < C
        # c is the first class of pair (c, k), k > c
        mj = mk & (ok > c)
        p1 = c * (2 * C - c - 1) // 2 + ok - c - 1
        m2 = mj[:, None] & md[None, :]
        vk = tl.load(V + base + ok[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        w1 = tl.load(A + p1[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        g1 = tl.load(DQ + b * P + p1, mask=mj, other=0.0).to(tl.float32)
        h1 = uc[None, :] + vk + be[None, :]
        acc_u += tl.sum(tl.where(h1 > 0, g1[:, None] * w1, 0.0), axis=0)
        # c is the second class of pair (k, c), k < c
        mi = mk & (ok < c)
        p2 = ok * (2 * C - ok - 1) // 2 + c - ok - 1
        m2 = mi[:, None] & md[None, :]
        uk = tl.load(U + base + ok[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        w2 = tl.load(A + p2[:, None] * D + od[None, :], mask=m2, other=0.0).to(tl.float32)
        g2 = tl.load(DQ + b * P + p2, mask=mi, other=0.0).to(tl.float32)
        h2 = uk + vc[None, :] + be[None, :]
        acc_v += tl.sum(tl.where(h2 > 0, g2[:, None] * w2, 0.0), axis=0)
    tl.store(DU + base + c * D + od, acc_u, mask=md)
    tl.store(DV + base + c * D + od, acc_v, mask=md)


_PAIR_CACHE: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _pair_index(C: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) int32 of the row-major upper triangle, cached per (C, device)."""
    key = (C, str(device))
    if key not in _PAIR_CACHE:
        ij = torch.triu_indices(C, C, 1, device=device).to(torch.int32)
        _PAIR_CACHE[key] = (ij[0].contiguous(), ij[1].contiguous())
    return _PAIR_CACHE[key]


def _launch_forward(U, V, A, beta, c):  # type: ignore[no-untyped-def]
    B, C, D = U.shape
    P = A.shape[0]
    i, j = _pair_index(C, U.device)
    q = torch.empty(B, P, device=U.device, dtype=torch.float32)
    kernel(_fwd_kernel)[(triton.cdiv(P, _BP), B)](U, V, A, beta, c, i, j, q, C, P, D, BP=_BP, BD=_BD)
    return q.to(result_dtype(U, V, A, beta, c))


def _launch_backward(dq, U, V, A, beta):  # type: ignore[no-untyped-def]
    B, C, D = U.shape
    P = A.shape[0]
    dq = dq.contiguous()
    i, j = _pair_index(C, U.device)
    dA = torch.empty(P, D, device=U.device, dtype=torch.float32)
    kernel(_da_kernel)[(triton.cdiv(P, _BP), triton.cdiv(D, _BD))](
        U, V, beta, i, j, dq, dA, B, C, P, D, BP=_BP, BD=_BD
    )
    dU = torch.empty(B, C, D, device=U.device, dtype=torch.float32)
    dV = torch.empty(B, C, D, device=U.device, dtype=torch.float32)
    kernel(_duv_kernel)[(B, C, triton.cdiv(D, _BD))](U, V, A, beta, dq, dU, dV, C, P, D, BK=_BK, BD=_BD)
    dbeta = dU.sum(dim=(0, 1))  # every pair's relu-gradient lands in exactly one dU row
    dc = dq.float().sum(0)
    return dU.to(U.dtype), dV.to(V.dtype), dA.to(A.dtype), dbeta.to(beta.dtype), dc  # dc: float32


@torch.library.custom_op("sst_kernels::pair_cooccurrence", mutates_args=())
def _pairs_op(
    U: torch.Tensor, V: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    return _launch_forward(U.contiguous(), V.contiguous(), A.contiguous(), beta.contiguous(), c.contiguous())


@_pairs_op.register_fake
def _(U, V, A, beta, c):  # type: ignore[no-untyped-def]
    return U.new_empty(U.shape[0], A.shape[0], dtype=result_dtype(U, V, A, beta, c))


@torch.library.custom_op("sst_kernels::pair_cooccurrence_bwd", mutates_args=())
def _pairs_bwd(
    dq: torch.Tensor, U: torch.Tensor, V: torch.Tensor, A: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(dq, U.contiguous(), V.contiguous(), A.contiguous(), beta.contiguous())


@_pairs_bwd.register_fake
def _(dq, U, V, A, beta):  # type: ignore[no-untyped-def]
    return (
        torch.empty_like(U),
        torch.empty_like(V),
        torch.empty_like(A),
        torch.empty_like(beta),
        A.new_empty(A.shape[0], dtype=torch.float32),
    )


def _setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    U, V, A, beta, c = inputs
    ctx.save_for_backward(U, V, A, beta)
    ctx.c_dtype = c.dtype


def _backward(ctx, dq):  # type: ignore[no-untyped-def]
    U, V, A, beta = ctx.saved_tensors
    dU, dV, dA, dbeta, dc = _pairs_bwd(dq, U, V, A, beta)
    return dU, dV, dA, dbeta, dc.to(ctx.c_dtype)


torch.library.register_autograd("sst_kernels::pair_cooccurrence", _backward, setup_context=_setup)


def pair_cooccurrence_triton(
    U: torch.Tensor, V: torch.Tensor, A: torch.Tensor, beta: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """U, V (B,C,D), A (P,D), beta (D,), c (P,) -> q (B,P), P = C(C-1)/2; differentiable in all.

    Non-contiguous inputs are copied to contiguous; one device; mixed float dtypes are fine (q
    takes the promoted dtype, each gradient its input's dtype).
    """
    U, V, A = check_float("U", U, 3), check_float("V", V, 3), check_float("A", A, 2)
    beta, c = check_float("beta", beta, 1), check_float("c", c, 1)
    same_device(U=U, V=V, A=A, beta=beta, c=c)
    B, C, D = U.shape
    P = C * (C - 1) // 2
    if V.shape != U.shape:
        raise ValueError(f"V {tuple(V.shape)} must match U {tuple(U.shape)}")
    if A.shape != (P, D) or beta.shape != (D,) or c.shape != (P,):
        raise ValueError(
            f"with C={C}, D={D} expected A ({P},{D}), beta ({D},), c ({P},); got "
            f"A {tuple(A.shape)}, beta {tuple(beta.shape)}, c {tuple(c.shape)}"
        )
    if min(B, P, D) == 0:
        raise ValueError(f"empty input: U {tuple(U.shape)}, A {tuple(A.shape)} (need C >= 2)")
    return _pairs_op(U, V, A, beta, c)


def aot_specs(T: str = "*fp32") -> list:
    """(kernel, signature, constexprs) of every kernel as launched, for the offline sm_90 compile test."""
    F32, I, IP = "*fp32", "i32", "*i32"
    return [
        (
            _fwd_kernel,
            dict(U=T, V=T, A=T, BETA=T, CB=T, I=IP, J=IP, Q=F32, C=I, P=I, D=I),
            dict(BP=_BP, BD=_BD),
        ),
        (
            _da_kernel,
            dict(U=T, V=T, BETA=T, I=IP, J=IP, DQ=T, DA=F32, B=I, C=I, P=I, D=I),
            dict(BP=_BP, BD=_BD),
        ),
        (_duv_kernel, dict(U=T, V=T, A=T, BETA=T, DQ=T, DU=F32, DV=F32, C=I, P=I, D=I), dict(BK=_BK, BD=_BD)),
    ]
