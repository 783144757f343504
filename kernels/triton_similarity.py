"""Triton kernels for the cross-image parts: bank similarity + pseudo labels, cosine Gram, bank FIFO.

- bank_pseudo_labels_triton: sim[b,c] = (f/|f|) . mean_k(m_k/|m_k|) (DESIGN §3 identity): row
  norms -> per-class mean of normalized bank rows -> cosine + threshold, never a (B,C,K) tensor.
- class_cosine_gram_triton: G[c,i,j] = cos(f[i,c], f[j,c]) with backward.
- bank_update_triton: newest-first FIFO insert of the batch's positives, all classes, one launch.

Cosine convention (same as torch.nn.functional.cosine_similarity): each norm is clamped,
x.y / (max(|x|, eps) max(|y|, eps)) with eps = 1e-8, so zero rows give 0. Accumulation is
float32; sim and G are float32 before the final cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_common import block, check_float, check_labels, kernel, same_device

EPS = 1e-8
_BR, _BF, _BK = 16, 128, 16
_BF_DOT = 32  # feature tile of the Gram kernels (tl.dot operands; 128 spills registers on sm_90)


@triton.jit
def _row_norm_kernel(X, NRM, R, F, BR: tl.constexpr, BF: tl.constexpr):
    """NRM[r] = |X[r,:]| for a (R,F) row-major matrix."""
    orow = tl.program_id(0) * BR + tl.arange(0, BR)
    mr = orow < R
    r64 = orow.to(tl.int64)
    ss = tl.zeros((BR,), dtype=tl.float32)
    for f0 in range(0, F, BF):
        of = f0 + tl.arange(0, BF)
        x = tl.load(X + r64[:, None] * F + of[None, :], mask=mr[:, None] & (of < F)[None, :], other=0.0)
        x = x.to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    tl.store(NRM + orow, tl.sqrt(ss), mask=mr)


@triton.jit
def _proto_kernel(BANK, NRM, PROTO, K, F, eps, BK: tl.constexpr, BF: tl.constexpr):
    """PROTO[c,f] = mean_k BANK[c,k,f] / max(|BANK[c,k]|, eps) (zero rows add 0)."""
    c = tl.program_id(0).to(tl.int64)
    of = tl.program_id(1) * BF + tl.arange(0, BF)
    mf = of < F
    acc = tl.zeros((BF,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ok = k0 + tl.arange(0, BK)
        mk = ok < K
        inv = 1.0 / tl.maximum(tl.load(NRM + c * K + ok, mask=mk, other=1.0), eps)
        m = tl.load(BANK + (c * K + ok[:, None]) * F + of[None, :], mask=mk[:, None] & mf[None, :], other=0.0)
        acc += tl.sum(m.to(tl.float32) * inv[:, None], axis=0)
    tl.store(PROTO + c * F + of, acc / K, mask=mf)


@triton.jit
def _sim_label_kernel(
    FEAT, NRM, PROTO, LAB, SIM, OUT, B, C, F, margin, eps, BB: tl.constexpr, BF: tl.constexpr
):
    """sim = f . proto / max(|f|, eps); unknown labels (0) with sim >= margin become +1."""
    c = tl.program_id(0).to(tl.int64)
    ob = tl.program_id(1) * BB + tl.arange(0, BB)
    mb = ob < B
    rows = ob.to(tl.int64) * C + c
    acc = tl.zeros((BB,), dtype=tl.float32)
    for f0 in range(0, F, BF):
        of = f0 + tl.arange(0, BF)
        mf = of < F
        x = tl.load(FEAT + rows[:, None] * F + of[None, :], mask=mb[:, None] & mf[None, :], other=0.0)
        p = tl.load(PROTO + c * F + of, mask=mf, other=0.0)
        acc += tl.sum(x.to(tl.float32) * p[None, :], axis=1)
    sim = acc / tl.maximum(tl.load(NRM + rows, mask=mb, other=1.0), eps)
    lab = tl.load(LAB + rows, mask=mb, other=0)
    new = tl.where((lab == 0) & (sim >= margin), 1, lab)
    tl.store(SIM + rows, sim, mask=mb)
    tl.store(OUT + rows, new.to(OUT.dtype.element_ty), mask=mb)


@triton.jit
def _gram_kernel(FEAT, NRM, G, B, C, F, eps, BI: tl.constexpr, BJ: tl.constexpr, BF: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    oi = tl.program_id(1) * BI + tl.arange(0, BI)
    oj = tl.program_id(2) * BJ + tl.arange(0, BJ)
    mi, mj = oi < B, oj < B
    ri, rj = oi.to(tl.int64) * C + c, oj.to(tl.int64) * C + c
    acc = tl.zeros((BI, BJ), dtype=tl.float32)
    for f0 in range(0, F, BF):
        of = f0 + tl.arange(0, BF)
        mf = of < F
        xi = tl.load(FEAT + ri[:, None] * F + of[None, :], mask=mi[:, None] & mf[None, :], other=0.0)
        xj = tl.load(FEAT + rj[:, None] * F + of[None, :], mask=mj[:, None] & mf[None, :], other=0.0)
        acc += tl.dot(xi.to(tl.float32), tl.trans(xj.to(tl.float32)), input_precision="ieee")
    inv_i = 1.0 / tl.maximum(tl.load(NRM + ri, mask=mi, other=1.0), eps)
    inv_j = 1.0 / tl.maximum(tl.load(NRM + rj, mask=mj, other=1.0), eps)
    tl.store(
        G + c * B * B + oi[:, None] * B + oj[None, :],
        acc * inv_i[:, None] * inv_j[None, :],
        mask=mi[:, None] & mj[None, :],
    )


@triton.jit
def _gram_bwd_kernel(
    FEAT, NRM, G, DG, DF, B, C, F, eps, BI: tl.constexpr, BJ: tl.constexpr, BF: tl.constexpr
):
    """dn_i = sum_j (dG_ij + dG_ji) n_j; df_i = (dn_i - n_i (n_i . dn_i)) / |f_i| (clamped: dn_i / eps)."""
    c = tl.program_id(0).to(tl.int64)
    oi = tl.program_id(1) * BI + tl.arange(0, BI)
    of = tl.program_id(2) * BF + tl.arange(0, BF)
    mi, mf = oi < B, of < F
    ri = oi.to(tl.int64) * C + c
    dn = tl.zeros((BI, BF), dtype=tl.float32)
    s = tl.zeros((BI,), dtype=tl.float32)
    for j0 in range(0, B, BJ):
        oj = j0 + tl.arange(0, BJ)
        mj = oj < B
        rj = oj.to(tl.int64) * C + c
        m2 = mi[:, None] & mj[None, :]
        gs = tl.load(DG + c * B * B + oi[:, None] * B + oj[None, :], mask=m2, other=0.0).to(tl.float32)
        gs += tl.load(DG + c * B * B + oj[None, :] * B + oi[:, None], mask=m2, other=0.0).to(tl.float32)
        g = tl.load(G + c * B * B + oi[:, None] * B + oj[None, :], mask=m2, other=0.0)
        s += tl.sum(gs * g, axis=1)  # = n_i . dn_i
        inv_j = 1.0 / tl.maximum(tl.load(NRM + rj, mask=mj, other=1.0), eps)
        xj = tl.load(FEAT + rj[:, None] * F + of[None, :], mask=mj[:, None] & mf[None, :], other=0.0)
        dn += tl.dot(gs, xj.to(tl.float32) * inv_j[:, None], input_precision="ieee")
    nrm_i = tl.load(NRM + ri, mask=mi, other=1.0)
    inv_i = 1.0 / tl.maximum(nrm_i, eps)
    s = tl.where(nrm_i > eps, s, 0.0)
    xi = tl.load(FEAT + ri[:, None] * F + of[None, :], mask=mi[:, None] & mf[None, :], other=0.0)
    df = inv_i[:, None] * (dn - xi.to(tl.float32) * inv_i[:, None] * s[:, None])
    tl.store(DF + ri[:, None] * F + of[None, :], df, mask=mi[:, None] & mf[None, :])


@triton.jit
def _bank_update_kernel(
    BANK, FEAT, LAB, OUT, B, C, K, F, BB: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr
):
    """Slot k < n_c takes the k-th positive of the batch (batch order), slot k >= n_c old slot k - n_c."""
    c = tl.program_id(0).to(tl.int64)
    ok = tl.program_id(1) * BK + tl.arange(0, BK)
    of = tl.program_id(2) * BF + tl.arange(0, BF)
    mk, mf = ok < K, of < F
    ob = tl.arange(0, BB)
    lab = tl.load(LAB + ob.to(tl.int64) * C + c, mask=ob < B, other=0)
    pos = ((lab == 1) & (ob < B)).to(tl.int32)
    excl = tl.cumsum(pos, axis=0) - pos
    n = tl.sum(pos, axis=0)
    hit = (pos[None, :] == 1) & (excl[None, :] == ok[:, None])
    src_b = tl.sum(tl.where(hit, ob[None, :], 0), axis=1).to(tl.int64)
    is_new = ok < n
    m_new = (is_new & mk)[:, None] & mf[None, :]
    m_old = (~is_new & mk)[:, None] & mf[None, :]
    x = tl.load(FEAT + (src_b[:, None] * C + c) * F + of[None, :], mask=m_new, other=0.0)
    old = tl.load(BANK + (c * K + (ok - n)[:, None]) * F + of[None, :], mask=m_old, other=0.0)
    val = tl.where(is_new[:, None], x, old)
    tl.store(OUT + (c * K + ok[:, None]) * F + of[None, :], val, mask=mk[:, None] & mf[None, :])


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """Float32 L2 norms of the rows of x viewed as (-1, x.shape[-1])."""
    R, F = x.numel() // x.shape[-1], x.shape[-1]
    out = torch.empty(R, device=x.device, dtype=torch.float32)
    kernel(_row_norm_kernel)[(triton.cdiv(R, _BR),)](x, out, R, F, BR=_BR, BF=_BF)
    return out


@torch.library.custom_op("sst_kernels::bank_pseudo_labels", mutates_args=())
def _pseudo_op(
    features: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, F = features.shape
    K = bank.shape[1]
    proto = torch.empty(C, F, device=bank.device, dtype=torch.float32)
    kernel(_proto_kernel)[(C, triton.cdiv(F, _BF))](bank, _row_norms(bank), proto, K, F, EPS, BK=_BK, BF=_BF)
    sim = torch.empty(B, C, device=features.device, dtype=torch.float32)
    out = torch.empty_like(labels)
    bb = block(B, lo=16, hi=32)
    nrm, m = _row_norms(features), float(margin)
    kernel(_sim_label_kernel)[(C, triton.cdiv(B, bb))](
        features, nrm, proto, labels, sim, out, B, C, F, m, EPS, BB=bb, BF=_BF // 2
    )
    return sim, out


@_pseudo_op.register_fake
def _(features, bank, labels, margin):  # type: ignore[no-untyped-def]
    return labels.new_empty(labels.shape, dtype=torch.float32), torch.empty_like(labels)


def bank_pseudo_labels_triton(
    features: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B,C,F), bank (C,K,F), labels (B,C) -> (sim (B,C) float32, completed labels).

    No gradient (inputs are detached). Labels keep their dtype; unknown (0) with sim >= margin -> +1.
    """
    features, bank = check_float("features", features, 3), check_float("bank", bank, 3)
    same_device(features=features, bank=bank)
    B, C, F = features.shape
    if bank.shape[0] != C or bank.shape[2] != F:
        raise ValueError(
            f"bank {tuple(bank.shape)} must be (C,K,F) = ({C},K,{F}) for features {tuple(features.shape)}"
        )
    if bank.shape[1] == 0 or min(B, C, F) == 0:
        raise ValueError(f"empty input: features {tuple(features.shape)}, bank {tuple(bank.shape)}")
    labels = check_labels("labels", labels, (B, C), features.device)
    return _pseudo_op(features.detach(), bank.detach(), labels, float(margin))


@torch.library.custom_op("sst_kernels::class_cosine_gram", mutates_args=())
def _gram_op(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, C, F = features.shape
    nrm = _row_norms(features)
    G = torch.empty(C, B, B, device=features.device, dtype=torch.float32)
    bi = block(B, lo=16, hi=32)
    kernel(_gram_kernel)[(C, triton.cdiv(B, bi), triton.cdiv(B, bi))](
        features, nrm, G, B, C, F, EPS, BI=bi, BJ=bi, BF=_BF_DOT
    )
    return G, nrm


@_gram_op.register_fake
def _(features):  # type: ignore[no-untyped-def]
    B, C, _ = features.shape
    return (features.new_empty(C, B, B, dtype=torch.float32), features.new_empty(B * C, dtype=torch.float32))


@torch.library.custom_op("sst_kernels::class_cosine_gram_bwd", mutates_args=())
def _gram_bwd(dG: torch.Tensor, features: torch.Tensor, nrm: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    B, C, F = features.shape
    dF = torch.empty(B, C, F, device=features.device, dtype=torch.float32)
    bi = block(B, lo=16, hi=32)
    kernel(_gram_bwd_kernel)[(C, triton.cdiv(B, bi), triton.cdiv(F, _BF_DOT))](
        features, nrm, G, dG.contiguous(), dF, B, C, F, EPS, BI=bi, BJ=bi, BF=_BF_DOT
    )
    return dF.to(features.dtype)


@_gram_bwd.register_fake
def _(dG, features, nrm, G):  # type: ignore[no-untyped-def]
    return torch.empty_like(features)


def _gram_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    G, nrm = output
    ctx.save_for_backward(inputs[0], nrm, G)


def _gram_backward(ctx, dG, _dnrm):  # type: ignore[no-untyped-def]
    features, nrm, G = ctx.saved_tensors
    return _gram_bwd(dG, features, nrm, G)


torch.library.register_autograd("sst_kernels::class_cosine_gram", _gram_backward, setup_context=_gram_setup)


def class_cosine_gram_triton(features: torch.Tensor) -> torch.Tensor:
    """features (B,C,F) -> G (C,B,B) = per-class cosine across the batch, eps 1e-8 per norm.

    Differentiable in features; G is returned in the features' dtype (float32 inside).
    """
    features = check_float("features", features, 3)
    if min(features.shape) == 0:
        raise ValueError(f"empty input: features {tuple(features.shape)}")
    return _gram_op(features)[0].to(features.dtype)


@torch.library.custom_op("sst_kernels::bank_update", mutates_args=())
def _update_op(bank: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    C, K, F = bank.shape
    B = features.shape[0]
    out = torch.empty_like(bank)
    bb = triton.next_power_of_2(max(B, 2))
    kernel(_bank_update_kernel)[(C, triton.cdiv(K, _BK), triton.cdiv(F, _BF))](
        bank, features, labels, out, B, C, K, F, BB=bb, BK=_BK, BF=_BF
    )
    return out


@_update_op.register_fake
def _(bank, features, labels):  # type: ignore[no-untyped-def]
    return torch.empty_like(bank)


def bank_update_triton(bank: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """New bank (C,K,F): per class, the batch's positives (batch order) then the old slots, cut to K.

    No gradient; the result has the bank's dtype (features are cast to it).
    """
    bank, features = check_float("bank", bank, 3), check_float("features", features, 3)
    same_device(bank=bank, features=features)
    B, C, F = features.shape
    if bank.shape[0] != C or bank.shape[2] != F:
        raise ValueError(
            f"bank {tuple(bank.shape)} must be (C,K,F) = ({C},K,{F}) for features {tuple(features.shape)}"
        )
    labels = check_labels("labels", labels, (B, C), features.device)
    if bank.numel() == 0 or B == 0:
        return bank.clone()
    # cast on the host: torch rounds to nearest even (the interpreter's in-kernel cast truncates)
    return _update_op(bank.detach(), features.detach().to(bank.dtype), labels)


def aot_specs(T: str = "*fp32") -> list:
    """(kernel, signature, constexprs) of every kernel as launched, for the offline sm_90 compile test."""
    F32, I, L, E = "*fp32", "i32", "*i8", "fp32"
    return [
        (_row_norm_kernel, dict(X=T, NRM=F32, R=I, F=I), dict(BR=_BR, BF=_BF)),
        (_proto_kernel, dict(BANK=T, NRM=F32, PROTO=F32, K=I, F=I, eps=E), dict(BK=_BK, BF=_BF)),
        (
            _sim_label_kernel,
            dict(FEAT=T, NRM=F32, PROTO=F32, LAB=L, SIM=F32, OUT=L, B=I, C=I, F=I, margin=E, eps=E),
            dict(BB=32, BF=_BF // 2),
        ),
        (_gram_kernel, dict(FEAT=T, NRM=F32, G=F32, B=I, C=I, F=I, eps=E), dict(BI=32, BJ=32, BF=_BF_DOT)),
        (
            _gram_bwd_kernel,
            dict(FEAT=T, NRM=F32, G=F32, DG=F32, DF=F32, B=I, C=I, F=I, eps=E),
            dict(BI=32, BJ=32, BF=_BF_DOT),
        ),
        (
            _bank_update_kernel,
            dict(BANK=T, FEAT=T, LAB=L, OUT=T, B=I, C=I, K=I, F=I),
            dict(BB=32, BK=_BK, BF=_BF),
        ),
    ]
