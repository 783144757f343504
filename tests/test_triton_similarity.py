"""Triton bank similarity / pseudo labels, class cosine Gram and bank FIFO update vs slow references.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), at small odd shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.triton_similarity import (  # noqa: E402
    bank_pseudo_labels_triton,
    bank_update_triton,
    class_cosine_gram_triton,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference_bank_similarity(features, bank):
    """mean over the K slots of F.cosine_similarity (eps 1e-8; an all-zero slot gives 0), as DESIGN §3."""
    return F.cosine_similarity(features[:, :, None, :], bank[None], dim=-1).mean(-1)


def reference_cosine_gram(features):
    """G[c,i,j] = F.cosine_similarity(f[i,c], f[j,c]) directly."""
    fc = features.transpose(0, 1)  # (C,B,F)
    return F.cosine_similarity(fc[:, :, None, :], fc[:, None, :, :], dim=-1)


def reference_bank_update(bank, features, labels):
    """Per-class Python loop: the batch's positives in batch order, then the old slots, first K kept."""
    C, K, Fd = bank.shape
    rows = []
    for c in range(C):
        new = [features[b, c].to(bank.dtype) for b in range(features.shape[0]) if labels[b, c] == 1]
        rows.append(torch.cat([torch.stack(new) if new else bank.new_zeros(0, Fd), bank[c]])[:K])
    return torch.stack(rows)


def _data(B, C, K, Fd, seed=0):
    """Bank rows near a class direction; features either near it (high sim) or random (low)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(C, Fd, generator=g)
    bank = base[:, None, :] + 0.3 * torch.randn(C, K, Fd, generator=g)
    bank[:, K // 2 + 1 :] = 0  # a partly empty bank
    near = torch.rand(B, C, generator=g) < 0.5
    feats = torch.where(
        near[..., None], base + 0.3 * torch.randn(B, C, Fd, generator=g), torch.randn(B, C, Fd, generator=g)
    )
    feats[0, 0] = 0  # a zero feature gives sim 0
    labels = torch.randint(-1, 2, (B, C), generator=g)
    return feats, bank, labels


def _rel(x, ref):
    # floor 1e-2: with B=1 the exact gradient is 0 and float32 leaves ~1e-8
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()


@pytest.mark.parametrize(
    "B,C,K,Fd,dtype",
    [
        (1, 1, 1, 1, torch.float32),
        (5, 3, 7, 130, torch.float32),
        (17, 2, 17, 3, torch.float32),
        (33, 2, 3, 5, torch.float32),
        (4, 3, 5, 33, torch.bfloat16),
    ],
    ids=["ones", "above-F-block", "above-B-K-blocks", "B-two-blocks", "bf16"],
)
@pytest.mark.parametrize("label_dtype", [torch.int8, torch.float32])
def test_pseudo_labels_match_reference(B, C, K, Fd, dtype, label_dtype):
    feats, bank, labels = _data(B, C, K, Fd)
    feats, bank, labels = feats.to(DEV, dtype), bank.to(DEV, dtype), labels.to(DEV, label_dtype)
    ref_sim = reference_bank_similarity(feats.double(), bank.double())
    margin = 0.3
    labels_before = labels.clone()
    sim, out = bank_pseudo_labels_triton(feats, bank, labels, margin)
    assert sim.dtype == torch.float32 and out.dtype == label_dtype and sim.shape == (B, C)
    assert (sim.double() - ref_sim).abs().max().item() <= TOL[dtype]
    assert sim[0, 0].item() == 0.0
    safe = (ref_sim - margin).abs() > 3 * TOL[dtype]  # entries that cannot flip by rounding
    expect = torch.where((labels == 0) & (ref_sim >= margin), torch.ones_like(labels), labels)
    assert torch.equal(out[safe], expect[safe])
    assert torch.equal(labels, labels_before)  # input untouched


def test_pseudo_labels_turn_unknowns_positive():
    feats, bank, _ = _data(6, 3, 5, 8, seed=3)
    labels = torch.zeros(6, 3, dtype=torch.int64)
    labels[1] = -1
    sim, out = bank_pseudo_labels_triton(feats.to(DEV), bank.to(DEV), labels.to(DEV), 0.3)
    ref_sim = reference_bank_similarity(feats.double(), bank.double())
    n_up = ((ref_sim >= 0.3) & (labels == 0)).sum().item()
    assert n_up > 0 and (out.cpu() == 1).sum().item() == n_up
    assert (out.cpu()[1] == -1).all()  # known negatives stay


@pytest.mark.parametrize(
    "B,C,Fd",
    [(1, 1, 1), (17, 3, 130), (5, 2, 3), (33, 2, 5)],
    ids=["ones", "above-blocks", "primes", "B-two-blocks"],
)
def test_cosine_gram_matches_reference(B, C, Fd):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, Fd, generator=g).to(DEV)
    xt, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    G, Gr = class_cosine_gram_triton(xt), reference_cosine_gram(xr)
    assert G.shape == (C, B, B) and G.dtype == torch.float32
    assert (G.double() - Gr).abs().max().item() <= 1e-5
    dG = torch.randn(C, B, B, generator=g).to(DEV)
    G.backward(dG)
    Gr.backward(dG.double())
    assert _rel(xt.grad, xr.grad) <= 1e-5


def test_cosine_gram_bfloat16_and_zero_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 9, generator=g)
    x[2, 1] = 0
    xb = x.to(DEV, torch.bfloat16)
    xt, xr = xb.clone().requires_grad_(), xb.double().requires_grad_()
    G, Gr = class_cosine_gram_triton(xt), reference_cosine_gram(xr)
    assert G.dtype == torch.bfloat16
    assert (G.double() - Gr).abs().max().item() <= 2e-2
    assert (G[1, 2].float() == 0).all()
    dG = torch.randn(2, 6, 6, generator=g).to(DEV)
    G.float().backward(dG)
    Gr.backward(dG.double())
    assert torch.isfinite(xt.grad.float()).all()
    assert _rel(xt.grad, xr.grad) <= 2e-2


@pytest.mark.parametrize(
    "B,C,K,Fd", [(5, 3, 3, 130), (4, 2, 17, 3), (1, 1, 1, 1)], ids=["overflow", "big-K", "ones"]
)
def test_bank_update_matches_loop(B, C, K, Fd):
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(C, K, Fd, generator=g).to(DEV)
    feats = torch.randn(B, C, Fd, generator=g).to(DEV)
    labels = torch.randint(-1, 2, (B, C), generator=g).to(DEV)
    labels[:, 0] = 1  # class 0: every image positive (more than K when B > K)
    if C > 1:
        labels[:, 1] = 0  # class 1: no positive, bank unchanged
    before = bank.clone()
    new = bank_update_triton(bank, feats, labels)
    assert torch.equal(new, reference_bank_update(bank, feats, labels))
    assert torch.equal(bank, before)  # functional: the input bank is untouched


def test_bank_update_casts_features_to_bank_dtype():
    bank = torch.zeros(2, 4, 5, dtype=torch.bfloat16, device=DEV)
    feats = torch.randn(3, 2, 5, device=DEV)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]], device=DEV)
    new = bank_update_triton(bank, feats, labels)
    assert new.dtype == torch.bfloat16
    assert torch.equal(new, reference_bank_update(bank, feats, labels))


def test_errors(monkeypatch):
    feats, bank, labels = (t.to(DEV) for t in _data(3, 2, 4, 5))
    with pytest.raises(ValueError, match="bank .* must be"):
        bank_pseudo_labels_triton(feats, bank[:, :, :4], labels, 0.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        bank_pseudo_labels_triton(feats, bank, labels[:2], 0.5)
    with pytest.raises(TypeError, match="labels must be an int or float"):
        bank_update_triton(bank, feats, labels == 1)
    with pytest.raises(TypeError, match="features must be float32"):
        class_cosine_gram_triton(feats.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="features is on cpu.*TRITON_INTERPRET=1"):
        class_cosine_gram_triton(feats.cpu())


def test_torch_compile_traces_through_the_custom_ops():
    feats, bank, labels = (t.to(DEV) for t in _data(3, 2, 4, 5))
    x, xc = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    G, Gc = (
        class_cosine_gram_triton(x),
        torch.compile(class_cosine_gram_triton, backend="aot_eager", fullgraph=True)(xc),
    )
    G.sum().backward()
    Gc.sum().backward()
    assert torch.equal(G, Gc) and torch.equal(x.grad, xc.grad)
    pl = torch.compile(bank_pseudo_labels_triton, backend="aot_eager", fullgraph=True)
    assert all(
        torch.equal(u, v)
        for u, v in zip(pl(feats, bank, labels, 0.3), bank_pseudo_labels_triton(feats, bank, labels, 0.3))
    )
    up = torch.compile(bank_update_triton, backend="aot_eager", fullgraph=True)
    assert torch.equal(up(bank, feats, labels), bank_update_triton(bank, feats, labels))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_shapes_gpu():
    feats, bank, labels = (t.cuda() for t in _data(32, 80, 100, 1024))
    sim, _ = bank_pseudo_labels_triton(feats, bank, labels, 0.75)
    assert (sim.double() - reference_bank_similarity(feats.double(), bank.double())).abs().max() <= 1e-5
    x = feats.clone().requires_grad_()
    xr = feats.double().requires_grad_()
    G, Gr = class_cosine_gram_triton(x), reference_cosine_gram(xr)
    assert (G.double() - Gr).abs().max() <= 1e-5
    dG = torch.randn_like(G)
    G.backward(dG)
    Gr.backward(dG.double())
    assert _rel(x.grad, xr.grad) <= 1e-5
    assert torch.equal(bank_update_triton(bank, feats, labels), reference_bank_update(bank, feats, labels))
