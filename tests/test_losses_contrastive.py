"""Contrastive loss term: hand-worked values, a slow loop reference, fused vs reference vs Triton."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_losses import SHAPES, rand_labels, rel_err

from kernels.torch_similarity import class_cosine_gram_torch
from sst_dist.losses import LossWeights, contrastive, sst_loss_terms


def slow_contrastive(features: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Loop form. keys (C, B(B-1)/2) are the random keys the loss draws; the random subset of a kind
    is its 2n entries with the largest keys (= a uniform random subset), hardest = n largest terms."""
    B, C = labels.shape
    pos, kinds = [], {"pn": [], "nn": []}
    for c in range(C):
        p = 0
        for i in range(B):
            for j in range(i + 1, B):
                a, b = features[i, c], features[j, c]
                cos = (a @ b) / (a.norm() * b.norm())
                yi, yj = labels[i, c], labels[j, c]
                if yi == 1 and yj == 1:
                    pos.append(1 - cos)
                elif yi * yj == -1:
                    kinds["pn"].append((float(keys[c, p]), 1 + cos))
                elif yi == -1 and yj == -1:
                    kinds["nn"].append((float(keys[c, p]), 1 + cos))
                p += 1
    n = len(pos)
    kept = list(pos)
    for entries in kinds.values():
        if n == 0:
            kept += [t for _, t in entries]
            continue
        kept += [t for _, t in sorted(entries, key=lambda e: -e[0])[: 2 * n]]
        kept += sorted((t for _, t in entries), key=lambda t: -float(t.detach()))[:n]
    return torch.stack(kept).mean() if kept else features.sum() * 0


def test_contrastive_hand_worked() -> None:
    # B=3, C=1, labels [+1, +1, -1]; f0=(1,0), f1=(0,1), f2=(1,0).
    # (0,1) pos-pos: 1 - 0 = 1; (0,2) pos-neg: 1 + 1 = 2; (1,2) pos-neg: 1 + 0 = 1.
    # n = 1: random keeps min(2, 2) = both pos-neg entries, hardest adds the largest (2) again.
    # kept: 1, 2, 1, 2 -> mean 6 / 4 = 1.5, whatever the random keys.
    f = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([[1.0], [1.0], [-1.0]], dtype=torch.float64)
    for impl in ("reference", "fused"):
        t = contrastive(f, y, torch.Generator().manual_seed(0), impl=impl)
        assert t.numerator.item() == pytest.approx(6.0) and t.denominator.item() == 4
    # No positive pair: labels [+1, -1, -1] keeps all three: (0,1) 1+0, (0,2) 1+1, (1,2) 1+0 -> 4/3.
    t = contrastive(f, torch.tensor([[1.0], [-1.0], [-1.0]], dtype=torch.float64))
    assert t.value().item() == pytest.approx(4 / 3) and t.denominator.item() == 3
    # Unknown labels are never used: only (0,1) pos-pos is left -> 1.
    t = contrastive(f, torch.tensor([[1.0], [1.0], [0.0]], dtype=torch.float64))
    assert t.value().item() == pytest.approx(1.0) and t.denominator.item() == 1


def test_contrastive_selection_counts_and_generator() -> None:
    # B=8, C=1: 3 positives, 5 negatives -> 3 pos-pos, 15 pos-neg, 10 neg-neg entries.
    # n = 3: pos-neg keeps 6 random + 3 hardest, neg-neg 6 + 3 -> 3 + 9 + 9 = 21 kept.
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(8, 1, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 1, 1, -1, -1, -1, -1, -1], dtype=torch.float64).view(8, 1)
    t1 = contrastive(f, y, torch.Generator().manual_seed(1))
    t1b = contrastive(f, y, torch.Generator().manual_seed(1))
    assert t1.denominator.item() == 21 and torch.equal(t1.numerator, t1b.numerator)
    gens = [torch.Generator().manual_seed(s) for s in range(8)]
    values = {round(contrastive(f, y, g).numerator.item(), 9) for g in gens}
    assert len(values) > 1  # the random subset depends on the generator


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_contrastive_fused_vs_reference_vs_loop(B: int, C: int, dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(B * 13 + C)
    f = torch.randn(B, C, 6, generator=gen, dtype=torch.float64)
    y = rand_labels(B, C, gen)
    grads, vals = {}, {}
    for impl in ("reference", "fused"):
        x = f.to(dtype).clone().requires_grad_()
        v = contrastive(x, y.to(dtype), torch.Generator().manual_seed(9), impl=impl).value()
        v.backward()
        vals[impl], grads[impl] = v.detach().double(), x.grad.double()
    assert rel_err(vals["fused"], vals["reference"]) <= tol
    assert rel_err(grads["fused"], grads["reference"]) <= tol
    if dtype == torch.float64 and C <= 20:
        kgen = torch.Generator().manual_seed(9)
        keys = torch.rand((C, B * (B - 1) // 2), generator=kgen, dtype=torch.float64)
        x = f.clone().requires_grad_()
        want = slow_contrastive(x, y, keys)
        want.backward()
        assert rel_err(vals["fused"], want.detach()) <= 1e-10
        assert rel_err(grads["fused"], x.grad) <= 1e-10


def test_contrastive_single_image_is_zero() -> None:
    x = torch.randn(1, 3, 4, requires_grad=True)
    t = contrastive(x, torch.ones(1, 3))
    assert t.denominator.item() == 0 and t.value().item() == 0
    t.value().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_class_cosine_gram_gradcheck() -> None:
    f = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(class_cosine_gram_torch, (f,))
    g = class_cosine_gram_torch(f.detach())
    assert g.shape == (2, 3, 3)
    assert torch.allclose(g.diagonal(dim1=1, dim2=2), torch.ones(2, 3, dtype=torch.float64))


def test_contrastive_bad_inputs() -> None:
    with pytest.raises(ValueError, match="impl"):
        contrastive(torch.randn(2, 3, 4), torch.ones(2, 3), impl="numpy")
    with pytest.raises(ValueError, match="labels shape"):
        contrastive(torch.randn(2, 3, 4), torch.ones(3, 3))
    # label values are checked once per batch (sst_loss_terms, the trainer's prepare_batch), not per term
    with pytest.raises(ValueError, match=r"labels.*3\.0"):
        sst_loss_terms(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3, 4), torch.full((2, 3), 3.0),
                       None, None, 0, 0.0, LossWeights())


@pytest.mark.skipif(
    importlib.util.find_spec("kernels.triton_similarity") is None, reason="no kernels/triton_similarity.py"
)
def test_contrastive_triton_matches_fused() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(4)
    f = torch.randn(5, 3, 8, generator=gen).to(device)
    y = rand_labels(5, 3, gen).float().to(device)
    out = {}
    for impl in ("fused", "triton"):
        x = f.clone().requires_grad_()
        v = contrastive(x, y, torch.Generator(device=device).manual_seed(3), impl=impl).value()
        v.backward()
        out[impl] = (v.detach(), x.grad)
    torch.testing.assert_close(out["triton"][0], out["fused"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["triton"][1], out["fused"][1], rtol=1e-4, atol=1e-5)
