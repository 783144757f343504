"""Triton semantic-decoupling attention: f[b,c] = sum_s softmax_s(score[b,c,s]) X[b,s].

score[b,c,s] = sum_d a_d tanh(U[b,s,d] V[c,d]) (DESIGN §2 identity). The (B,S,C,D) tanh tensor
is never stored: forward keeps only the (B,C,S) float32 scores and the per-row softmax max and
sum (2,B,C) (kept apart, not as one logsumexp, so large scores lose no float32 precision);
backward recomputes tanh tiles in registers.

Layers: ``@triton.jit`` kernels -> ``_launch_*`` launchers -> ``torch.library`` custom ops with
fake impls and registered autograd (torch.compile traces around them) -> the public function.
All accumulation is float32; f comes back in the promoted input dtype, each gradient in its input's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_common import block, check_float, kernel, result_dtype, same_device, tanh_f32

_BC, _BS, _BD, _BF = 16, 16, 16, 64  # tiles: classes, positions, inner dim, feature dim
_BF_DS = 32  # feature tile of the dP recompute (64 spills registers on sm_90)
_DV_SPLIT = 16  # dV: batch split into at most this many partial sums (parallelism)


@triton.jit
def _scores_kernel(U, V, A, SC, S, C, D, BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    oc = tl.program_id(1) * BC + tl.arange(0, BC)
    os_ = tl.program_id(2) * BS + tl.arange(0, BS)
    mc, ms = oc < C, os_ < S
    acc = tl.zeros((BC, BS), dtype=tl.float32)
    for d0 in range(0, D, BD):
        od = d0 + tl.arange(0, BD)
        md = od < D
        v = tl.load(V + oc[:, None] * D + od[None, :], mask=mc[:, None] & md[None, :], other=0.0)
        u = tl.load(U + b * S * D + os_[:, None] * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        av = tl.load(A + od, mask=md, other=0.0).to(tl.float32)
        t = tanh_f32(v.to(tl.float32)[:, None, :] * u.to(tl.float32)[None, :, :])
        acc += tl.sum(t * av[None, None, :], axis=2)
    tl.store(SC + b * C * S + oc[:, None] * S + os_[None, :], acc, mask=mc[:, None] & ms[None, :])


@triton.jit
def _attend_kernel(SC, X, OUT, MX, SM, S, C, F, BC: tl.constexpr, BS: tl.constexpr, BF: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    oc = tl.program_id(1) * BC + tl.arange(0, BC)
    of = tl.program_id(2) * BF + tl.arange(0, BF)
    mc, mf = oc < C, of < F
    m = tl.full((BC,), -1e30, dtype=tl.float32)
    l = tl.zeros((BC,), dtype=tl.float32)
    for s0 in range(0, S, BS):  # pass 1: online max / sum over positions
        os_ = s0 + tl.arange(0, BS)
        msk = mc[:, None] & (os_ < S)[None, :]
        sc = tl.load(SC + b * C * S + oc[:, None] * S + os_[None, :], mask=msk, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(sc - m_new[:, None]), axis=1)
        m = m_new
    l = tl.where(l > 0, l, 1.0)
    acc = tl.zeros((BC, BF), dtype=tl.float32)
    for s0 in range(0, S, BS):  # pass 2: f = P @ X
        os_ = s0 + tl.arange(0, BS)
        ms = os_ < S
        msk = mc[:, None] & ms[None, :]
        sc = tl.load(SC + b * C * S + oc[:, None] * S + os_[None, :], mask=msk, other=0.0)
        p = tl.exp(tl.where(msk, sc - m[:, None], float("-inf"))) / l[:, None]
        x = tl.load(X + b * S * F + os_[:, None] * F + of[None, :], mask=ms[:, None] & mf[None, :], other=0.0)
        acc += tl.dot(p, x.to(tl.float32), input_precision="ieee")
    tl.store(OUT + b * C * F + oc[:, None] * F + of[None, :], acc, mask=mc[:, None] & mf[None, :])
    if tl.program_id(2) == 0:
        tl.store(MX + b * C + oc, m, mask=mc)
        tl.store(SM + b * C + oc, l, mask=mc)


@triton.jit
def _dp_tile(DF, X, b, oc, os_, mc, ms, S, C, F, BC: tl.constexpr, BS: tl.constexpr, BF: tl.constexpr):
    """dP[c,s] = sum_f dF[b,c,f] X[b,s,f] for one (BC,BS) tile."""
    dp = tl.zeros((BC, BS), dtype=tl.float32)
    for f0 in range(0, F, BF):
        of = f0 + tl.arange(0, BF)
        mf = of < F
        g = tl.load(DF + b * C * F + oc[:, None] * F + of[None, :], mask=mc[:, None] & mf[None, :], other=0.0)
        x = tl.load(X + b * S * F + os_[:, None] * F + of[None, :], mask=ms[:, None] & mf[None, :], other=0.0)
        dp += tl.dot(g.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
    return dp


@triton.jit
def _dscore_kernel(SC, MX, SM, DF, X, DS, S, C, F, BC: tl.constexpr, BS: tl.constexpr, BF: tl.constexpr):
    """dscore = P * (dP - sum_s P dP); dP recomputed in the second pass (no scratch RAW)."""
    b = tl.program_id(0).to(tl.int64)
    oc = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = oc < C
    mx = tl.load(MX + b * C + oc, mask=mc, other=0.0)
    sm = tl.load(SM + b * C + oc, mask=mc, other=1.0)
    rs = tl.zeros((BC,), dtype=tl.float32)
    for s0 in range(0, S, BS):
        os_ = s0 + tl.arange(0, BS)
        ms = os_ < S
        msk = mc[:, None] & ms[None, :]
        sc = tl.load(SC + b * C * S + oc[:, None] * S + os_[None, :], mask=msk, other=0.0)
        p = tl.where(msk, tl.exp(sc - mx[:, None]) / sm[:, None], 0.0)
        rs += tl.sum(p * _dp_tile(DF, X, b, oc, os_, mc, ms, S, C, F, BC, BS, BF), axis=1)
    for s0 in range(0, S, BS):
        os_ = s0 + tl.arange(0, BS)
        ms = os_ < S
        msk = mc[:, None] & ms[None, :]
        sc = tl.load(SC + b * C * S + oc[:, None] * S + os_[None, :], mask=msk, other=0.0)
        p = tl.where(msk, tl.exp(sc - mx[:, None]) / sm[:, None], 0.0)
        dp = _dp_tile(DF, X, b, oc, os_, mc, ms, S, C, F, BC, BS, BF)
        tl.store(DS + b * C * S + oc[:, None] * S + os_[None, :], p * (dp - rs[:, None]), mask=msk)


@triton.jit
def _dx_kernel(SC, MX, SM, DF, DX, S, C, F, BS: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr):
    """dX[b,s] = sum_c P[b,c,s] dF[b,c]."""
    b = tl.program_id(0).to(tl.int64)
    os_ = tl.program_id(1) * BS + tl.arange(0, BS)
    of = tl.program_id(2) * BF + tl.arange(0, BF)
    ms, mf = os_ < S, of < F
    acc = tl.zeros((BS, BF), dtype=tl.float32)
    for c0 in range(0, C, BC):
        oc = c0 + tl.arange(0, BC)
        mc = oc < C
        mx = tl.load(MX + b * C + oc, mask=mc, other=0.0)
        sm = tl.load(SM + b * C + oc, mask=mc, other=1.0)
        msk = ms[:, None] & mc[None, :]
        sc = tl.load(SC + b * C * S + oc[None, :] * S + os_[:, None], mask=msk, other=0.0)
        pt = tl.where(msk, tl.exp(sc - mx[None, :]) / sm[None, :], 0.0)  # (BS, BC) = P^T tile
        g = tl.load(DF + b * C * F + oc[:, None] * F + of[None, :], mask=mc[:, None] & mf[None, :], other=0.0)
        acc += tl.dot(pt, g.to(tl.float32), input_precision="ieee")
    tl.store(DX + b * S * F + os_[:, None] * F + of[None, :], acc, mask=ms[:, None] & mf[None, :])


@triton.jit
def _du_kernel(U, V, A, DS, DU, DAP, S, C, D, BS: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    """dU[b,s,d] = a_d sum_c ds (1-t^2) V[c,d]; per-program partial of da[d] = sum ds t."""
    b = tl.program_id(0).to(tl.int64)
    os_ = tl.program_id(1) * BS + tl.arange(0, BS)
    od = tl.program_id(2) * BD + tl.arange(0, BD)
    ms, md = os_ < S, od < D
    u = tl.load(U + b * S * D + os_[:, None] * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.0)
    u = u.to(tl.float32)
    acc_u = tl.zeros((BS, BD), dtype=tl.float32)
    acc_a = tl.zeros((BD,), dtype=tl.float32)
    for c0 in range(0, C, BC):
        oc = c0 + tl.arange(0, BC)
        mc = oc < C
        v = tl.load(V + oc[:, None] * D + od[None, :], mask=mc[:, None] & md[None, :], other=0.0)
        v = v.to(tl.float32)
        ds = tl.load(
            DS + b * C * S + oc[None, :] * S + os_[:, None], mask=ms[:, None] & mc[None, :], other=0.0
        )
        t = tanh_f32(u[:, None, :] * v[None, :, :])  # (BS, BC, BD)
        acc_u += tl.sum(ds[:, :, None] * (1.0 - t * t) * v[None, :, :], axis=1)
        acc_a += tl.sum(tl.sum(ds[:, :, None] * t, axis=1), axis=0)
    av = tl.load(A + od, mask=md, other=0.0).to(tl.float32)
    tl.store(
        DU + b * S * D + os_[:, None] * D + od[None, :], acc_u * av[None, :], mask=ms[:, None] & md[None, :]
    )
    row = b * tl.num_programs(1) + tl.program_id(1)
    tl.store(DAP + row * D + od, acc_a, mask=md)


@triton.jit
def _dv_kernel(U, V, A, DS, DVP, B, S, C, D, NB, BC: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """Partial dV[c,d] = a_d sum_{b,s} ds (1-t^2) U[b,s,d] over images b = g, g+NB, ...

    Program axis 2 (g) splits the batch so the grid fills the GPU; the NB partials are summed
    afterwards (deterministic: no atomics)."""
    g = tl.program_id(2)
    oc = tl.program_id(0) * BC + tl.arange(0, BC)
    od = tl.program_id(1) * BD + tl.arange(0, BD)
    mc, md = oc < C, od < D
    v = tl.load(V + oc[:, None] * D + od[None, :], mask=mc[:, None] & md[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BC, BD), dtype=tl.float32)
    for b in range(g, B, NB):  # b * S * D stays below 2**31 while U has fewer elements
        b64 = b
        for s0 in range(0, S, BS):
            os_ = s0 + tl.arange(0, BS)
            ms = os_ < S
            u = tl.load(
                U + b64 * S * D + os_[:, None] * D + od[None, :], mask=ms[:, None] & md[None, :], other=0.0
            )
            u = u.to(tl.float32)
            ds = tl.load(
                DS + b64 * C * S + oc[:, None] * S + os_[None, :], mask=mc[:, None] & ms[None, :], other=0.0
            )
            t = tanh_f32(v[:, None, :] * u[None, :, :])  # (BC, BS, BD)
            acc += tl.sum(ds[:, :, None] * (1.0 - t * t) * u[None, :, :], axis=1)
    av = tl.load(A + od, mask=md, other=0.0).to(tl.float32)
    tl.store(
        DVP + g * C * D + oc[:, None] * D + od[None, :], acc * av[None, :], mask=mc[:, None] & md[None, :]
    )


def _launch_forward(U, V, a, X):  # type: ignore[no-untyped-def]
    B, S, D = U.shape
    C, F = V.shape[0], X.shape[2]
    scores = torch.empty(B, C, S, device=U.device, dtype=torch.float32)
    stats = torch.empty(2, B, C, device=U.device, dtype=torch.float32)  # row max, sum of exp
    out = torch.empty(B, C, F, device=U.device, dtype=torch.float32)
    kernel(_scores_kernel)[(B, triton.cdiv(C, _BC), triton.cdiv(S, _BS))](
        U, V, a, scores, S, C, D, BC=_BC, BS=_BS, BD=_BD
    )
    bs = block(S, hi=64)
    kernel(_attend_kernel)[(B, triton.cdiv(C, _BC), triton.cdiv(F, _BF))](
        scores, X, out, stats[0], stats[1], S, C, F, BC=_BC, BS=bs, BF=_BF
    )
    return out.to(result_dtype(U, V, a, X)), scores, stats


def _launch_backward(dout, U, V, a, X, scores, stats):  # type: ignore[no-untyped-def]
    B, S, D = U.shape
    C, F = V.shape[0], X.shape[2]
    dout = dout.contiguous()
    ds = torch.empty(B, C, S, device=U.device, dtype=torch.float32)
    bs = block(S, hi=32)
    kernel(_dscore_kernel)[(B, triton.cdiv(C, _BC))](
        scores, stats[0], stats[1], dout, X, ds, S, C, F, BC=_BC, BS=bs, BF=_BF_DS
    )
    dX = torch.empty(B, S, F, device=U.device, dtype=torch.float32)
    kernel(_dx_kernel)[(B, triton.cdiv(S, bs), triton.cdiv(F, _BF))](
        scores, stats[0], stats[1], dout, dX, S, C, F, BS=bs, BC=_BC, BF=_BF
    )
    dU = torch.empty(B, S, D, device=U.device, dtype=torch.float32)
    n_sb = triton.cdiv(S, _BS)
    da_part = torch.empty(B * n_sb, D, device=U.device, dtype=torch.float32)
    kernel(_du_kernel)[(B, n_sb, triton.cdiv(D, _BD))](
        U, V, a, ds, dU, da_part, S, C, D, BS=_BS, BC=_BC, BD=_BD
    )
    nb = min(B, _DV_SPLIT)
    dV = torch.empty(nb, C, D, device=U.device, dtype=torch.float32)
    kernel(_dv_kernel)[(triton.cdiv(C, _BC), triton.cdiv(D, _BD), nb)](
        U, V, a, ds, dV, B, S, C, D, nb, BC=_BC, BS=_BS, BD=_BD
    )
    return dU.to(U.dtype), dV.sum(0).to(V.dtype), da_part.sum(0).to(a.dtype), dX.to(X.dtype)


@torch.library.custom_op("sst_kernels::semantic_attention_fwd", mutates_args=())
def _sa_fwd(
    U: torch.Tensor, V: torch.Tensor, a: torch.Tensor, X: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(U.contiguous(), V.contiguous(), a.contiguous(), X.contiguous())


@_sa_fwd.register_fake
def _(U, V, a, X):  # type: ignore[no-untyped-def]
    B, S, _ = U.shape
    C, F = V.shape[0], X.shape[2]
    return (
        X.new_empty(B, C, F, dtype=result_dtype(U, V, a, X)),
        U.new_empty(B, C, S, dtype=torch.float32),
        U.new_empty(2, B, C, dtype=torch.float32),
    )


@torch.library.custom_op("sst_kernels::semantic_attention_bwd", mutates_args=())
def _sa_bwd(
    dout: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    a: torch.Tensor,
    X: torch.Tensor,
    scores: torch.Tensor,
    stats: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(
        dout, U.contiguous(), V.contiguous(), a.contiguous(), X.contiguous(), scores, stats
    )


@_sa_bwd.register_fake
def _(dout, U, V, a, X, scores, stats):  # type: ignore[no-untyped-def]
    return torch.empty_like(U), torch.empty_like(V), torch.empty_like(a), torch.empty_like(X)


def _setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    U, V, a, X = inputs
    _, scores, stats = output
    ctx.save_for_backward(U, V, a, X, scores, stats)


def _backward(ctx, dout, _dscores, _dstats):  # type: ignore[no-untyped-def]
    U, V, a, X, scores, stats = ctx.saved_tensors
    return _sa_bwd(dout, U, V, a, X, scores, stats)


torch.library.register_autograd("sst_kernels::semantic_attention_fwd", _backward, setup_context=_setup)


def semantic_attention_triton(
    U: torch.Tensor, V: torch.Tensor, a: torch.Tensor, X: torch.Tensor
) -> torch.Tensor:
    """U (B,S,D), V (C,D), a (D,), X (B,S,F) -> f (B,C,F); differentiable in all four.

    Non-contiguous inputs are copied to contiguous; one device; mixed float dtypes are fine (f
    takes the promoted dtype, each gradient its input's dtype).
    """
    U, V = check_float("U", U, 3), check_float("V", V, 2)
    a, X = check_float("a", a, 1), check_float("X", X, 3)
    same_device(U=U, V=V, a=a, X=X)
    B, S, D = U.shape
    if V.shape[1] != D or a.shape[0] != D:
        raise ValueError(f"inner dims differ: U {tuple(U.shape)}, V {tuple(V.shape)}, a {tuple(a.shape)}")
    if X.shape[:2] != (B, S):
        raise ValueError(f"X {tuple(X.shape)} must be (B,S,F) with (B,S)=({B},{S}) like U")
    if min(B, S, D, V.shape[0], X.shape[2]) == 0:
        raise ValueError(f"empty input: U {tuple(U.shape)}, V {tuple(V.shape)}, X {tuple(X.shape)}")
    return _sa_fwd(U, V, a, X)[0]


def aot_specs(T: str = "*fp32") -> list:
    """(kernel, signature, constexprs) of every kernel as launched, for the offline sm_90 compile test."""
    F32, I = "*fp32", "i32"
    return [
        (_scores_kernel, dict(U=T, V=T, A=T, SC=F32, S=I, C=I, D=I), dict(BC=_BC, BS=_BS, BD=_BD)),
        (
            _attend_kernel,
            dict(SC=F32, X=T, OUT=F32, MX=F32, SM=F32, S=I, C=I, F=I),
            dict(BC=_BC, BS=64, BF=_BF),
        ),
        (
            _dscore_kernel,
            dict(SC=F32, MX=F32, SM=F32, DF=T, X=T, DS=F32, S=I, C=I, F=I),
            dict(BC=_BC, BS=32, BF=_BF),
        ),
        (_dx_kernel, dict(SC=F32, MX=F32, SM=F32, DF=T, DX=F32, S=I, C=I, F=I), dict(BS=32, BC=_BC, BF=_BF)),
        (
            _du_kernel,
            dict(U=T, V=T, A=T, DS=F32, DU=F32, DAP=F32, S=I, C=I, D=I),
            dict(BS=_BS, BC=_BC, BD=_BD),
        ),
        (
            _dv_kernel,
            dict(U=T, V=T, A=T, DS=F32, DVP=F32, B=I, S=I, C=I, D=I, NB=I),
            dict(BC=_BC, BS=_BS, BD=_BD),
        ),
    ]
