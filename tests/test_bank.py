"""MemoryBank: FIFO update, inter-image pseudo labels (reference vs fused identity), state_dict."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from kernels.torch_similarity import bank_pseudo_labels_torch, bank_update_torch
from sst_dist.model.bank import MemoryBank

SHAPES = [(B, C) for B in (1, 3, 8) for C in (3, 7, 20, 80)]


def slow_update(bank: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's per-class loop: cat(batch positives in batch order, old rows)[:K]."""
    C, K, F = bank.shape
    out = bank.clone()
    for c in range(C):
        rows = [features[b, c] for b in range(features.shape[0]) if labels[b, c] == 1]
        rows += [bank[c, k] for k in range(K)]
        out[c] = torch.stack(rows[:K])
    return out


def slow_sim(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """mean_k cos(f[b,c], bank[c,k]) one cosine at a time; a zero vector gives cosine 0."""
    B, C, F = features.shape
    K = bank.shape[1]
    sim = torch.zeros(B, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            total = 0.0
            for k in range(K):
                x, m = features[b, c].double(), bank[c, k].double()
                nx, nm = float(x.norm()), float(m.norm())
                total += 0.0 if nx == 0 or nm == 0 else float(x @ m) / (nx * nm)
            sim[b, c] = total / K
    return sim


def rand_labels(B: int, C: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (B, C), generator=gen).double()


def test_update_hand_worked() -> None:
    # C=2, K=3, F=1. Batch 1: class 0 positives at b=0 (1.), b=2 (3.); class 1 positive at b=1 (20.).
    mb = MemoryBank(2, 3, 1).double()
    f1 = torch.tensor([[[1.0], [10.0]], [[2.0], [20.0]], [[3.0], [30.0]]], dtype=torch.float64)
    y1 = torch.tensor([[1, 0], [-1, 1], [1, -1]], dtype=torch.float64)
    mb.update(f1, y1)
    # class 0: [1, 3, 0]; class 1: [20, 0, 0]
    assert mb.bank[:, :, 0].tolist() == [[1.0, 3.0, 0.0], [20.0, 0.0, 0.0]]
    assert mb.filled.tolist() == [2, 1]
    # Batch 2: class 0 positive at b=0 (4.) -> [4, 1, 3]; class 1 positives 5., 6. -> [5, 6, 20].
    f2 = torch.tensor([[[4.0], [5.0]], [[0.0], [6.0]]], dtype=torch.float64)
    y2 = torch.tensor([[1, 1], [0, 1]], dtype=torch.float64)
    mb.update(f2, y2)
    assert mb.bank[:, :, 0].tolist() == [[4.0, 1.0, 3.0], [5.0, 6.0, 20.0]]
    assert mb.filled.tolist() == [3, 3]


def test_update_overflow_keeps_first_k_of_batch() -> None:
    # 5 positives of class 0 into K=2: the first two in batch order (newest first), old rows drop.
    bank = torch.full((1, 2, 1), 9.0)
    feats = torch.arange(5.0).view(5, 1, 1)
    out = bank_update_torch(bank, feats, torch.ones(5, 1))
    assert out[0, :, 0].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("B,C", SHAPES)
def test_update_matches_slow_loop(B: int, C: int) -> None:
    gen = torch.Generator().manual_seed(B * 100 + C)
    K, F = 4, 5
    mb = MemoryBank(C, K, F).double()
    expected = torch.zeros(C, K, F, dtype=torch.float64)
    filled = torch.zeros(C, dtype=torch.long)
    for _ in range(3):
        feats = torch.randn(B, C, F, generator=gen, dtype=torch.float64)
        labels = rand_labels(B, C, gen)
        expected = slow_update(expected, feats, labels)
        filled = (filled + (labels == 1).sum(0)).clamp_max(K)
        mb.update(feats, labels, impl="fused")
        assert torch.equal(mb.bank, expected)
        assert torch.equal(mb.filled, filled)


def test_update_ignores_nonfinite_or_disabled_batch_and_keeps_bank() -> None:
    """Decided on the device (no exception, no host read): the bank and its counts stay as they were."""
    mb = MemoryBank(3, 2, 4)
    assert bool(mb.update(torch.randn(2, 3, 4), torch.ones(2, 3)))
    before = mb.bank.clone(), mb.filled.clone()
    bad = torch.randn(2, 3, 4)
    bad[1, 2, 0] = math.nan
    assert not bool(mb.update(bad, torch.ones(2, 3)))
    bad[1, 2, 0] = math.inf
    assert not bool(mb.update(bad, torch.ones(2, 3)))
    assert torch.equal(mb.bank, before[0]) and torch.equal(mb.filled, before[1])
    good = torch.randn(2, 3, 4)
    assert not bool(mb.update(good, torch.ones(2, 3), enabled=torch.tensor(False)))
    assert torch.equal(mb.bank, before[0]) and torch.equal(mb.filled, before[1])
    assert bool(mb.update(good, torch.ones(2, 3), enabled=torch.tensor(True)))
    assert torch.equal(mb.bank[:, 0], good[0]) and torch.equal(mb.filled, torch.full((3,), 2))


def test_bad_shapes_and_impl() -> None:
    mb = MemoryBank(3, 2, 4)
    with pytest.raises(ValueError, match="features"):
        mb.update(torch.randn(2, 4, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels"):
        mb.update(torch.randn(2, 3, 4), torch.ones(3, 3))
    with pytest.raises(ValueError, match="impl"):
        mb.pseudo_labels(torch.randn(2, 3, 4), torch.ones(2, 3), 0.5, impl="cuda")
    with pytest.raises(ValueError, match="size"):
        MemoryBank(3, 0, 4)


def test_pseudo_labels_hand_worked() -> None:
    # Class 0 bank: (1,0), (0,1), empty. f=(1,0): cos 1, 0, 0 -> 1/3. f=(2,2): 1/sqrt2, 1/sqrt2, 0 -> sqrt2/3.
    mb = MemoryBank(1, 3, 2).double()
    mb.bank[0, 0] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    mb.bank[0, 1] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    feats = torch.tensor([[[1.0, 0.0]], [[2.0, 2.0]], [[2.0, 2.0]]], dtype=torch.float64)
    labels = torch.tensor([[0.0], [0.0], [-1.0]], dtype=torch.float64)
    for impl in ("reference", "fused"):
        sim, out = mb.pseudo_labels(feats, labels, margin=0.4, impl=impl)
        assert sim[:, 0].tolist() == pytest.approx([1 / 3, math.sqrt(2) / 3, math.sqrt(2) / 3], rel=1e-12)
        # 1/3 < 0.4 stays unknown; 0.4714 >= 0.4 -> +1; the known -1 is kept.
        assert out[:, 0].tolist() == [0.0, 1.0, -1.0]


@pytest.mark.parametrize("B,C", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_pseudo_labels_reference_vs_fused(B: int, C: int, dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(7 * B + C)
    K, F = 5, 6
    mb = MemoryBank(C, K, F).to(dtype)
    # a shared direction makes similarities spread over [-1, 1] instead of clustering at 0
    base = torch.randn(1, C, F, generator=gen, dtype=torch.float64)
    for _ in range(2):
        feats = (base + 0.7 * torch.randn(B, C, F, generator=gen, dtype=torch.float64)).to(dtype)
        mb.update(feats, rand_labels(B, C, gen))
    feats = (base + torch.randn(B, C, F, generator=gen, dtype=torch.float64)).to(dtype)
    labels = rand_labels(B, C, gen).to(dtype)
    expected = slow_sim(feats, mb.bank)
    margin = float(expected.median())
    results = {impl: mb.pseudo_labels(feats, labels, margin, impl=impl) for impl in ("reference", "fused")}
    for sim, out in results.values():
        assert sim.dtype == dtype and out.dtype == labels.dtype
        err = (sim.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
        assert err <= tol
        clear = (expected - margin).abs() > 1e-4
        want = torch.where((labels == 0) & (expected >= margin), torch.ones_like(labels), labels)
        assert torch.equal(out[clear], want[clear])
        assert torch.equal(out[labels != 0], labels[labels != 0])


def test_bank_pseudo_labels_torch_empty_bank_gives_zero() -> None:
    sim, out = bank_pseudo_labels_torch(torch.randn(2, 3, 4), torch.zeros(3, 5, 4), torch.zeros(2, 3), 0.0)
    assert torch.equal(sim, torch.zeros(2, 3))
    assert torch.equal(out, torch.ones(2, 3))  # margin 0: sim 0 >= 0 -> +1


def test_state_dict_roundtrip() -> None:
    gen = torch.Generator().manual_seed(3)
    mb = MemoryBank(4, 3, 5)
    mb.update(torch.randn(6, 4, 5, generator=gen), rand_labels(6, 4, gen))
    sd = mb.state_dict()
    assert set(sd) == {"bank", "filled"}
    other = MemoryBank(4, 3, 5)
    other.load_state_dict(sd)
    feats, labels = torch.randn(2, 4, 5, generator=gen), rand_labels(2, 4, gen).float()
    a, b = mb.pseudo_labels(feats, labels, 0.1), other.pseudo_labels(feats, labels, 0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


HAS_TRITON_SIM = importlib.util.find_spec("kernels.triton_similarity") is not None


@pytest.mark.skipif(not HAS_TRITON_SIM, reason="kernels/triton_similarity.py not present")
def test_triton_impl_matches_fused() -> None:
    gen = torch.Generator().manual_seed(11)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, C, K, F = 3, 7, 4, 16
    feats = torch.randn(B, C, F, generator=gen).to(device)
    labels = rand_labels(B, C, gen).float().to(device)
    fused, tri = MemoryBank(C, K, F).to(device), MemoryBank(C, K, F).to(device)
    for _ in range(2):
        fused.update(feats, labels, impl="fused")
        tri.update(feats, labels, impl="triton")
        torch.testing.assert_close(tri.bank, fused.bank, rtol=1e-6, atol=1e-6)
    s1, _ = fused.pseudo_labels(feats, labels, 0.3, impl="fused")
    s2, _ = tri.pseudo_labels(feats, labels, 0.3, impl="triton")
    torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-5)
