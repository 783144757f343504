"""Whole SST heads with impl="triton" equal impl="fused" (outputs, every gradient, bank ops).

Without CUDA the Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1) at tiny dims.
"""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sst_dist.model import ModelConfig, SSTModel, cooccurrence_adjacency  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_model(C, F=24, H=16, D=20, E=6, K=5, seed=0):
    torch.manual_seed(seed)
    adj = cooccurrence_adjacency(torch.randint(-1, 2, (40, C)))
    cfg = ModelConfig(
        num_classes=C, backbone="resnet18", feature_dim=F, inter_dim=H, out_dim=D, embed_dim=E, bank_size=K
    )
    return SSTModel(cfg, adj).to(DEV)


def run_heads(model, X, impl, weights):
    model.impl = impl
    model.zero_grad(set_to_none=True)
    X = X.detach().clone().requires_grad_(True)
    out = model.heads(X)
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    grads = {
        n: p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")
    }
    grads["X"] = X.grad
    return out, grads


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("C,S,B", [(3, 1, 2), (7, 17, 3)], ids=["tiny", "odd"])
def test_triton_heads_equal_fused(C, S, B):
    model = make_model(C)
    F = model.cfg.feature_dim
    g = torch.Generator().manual_seed(1)
    X = torch.randn(B, S, F, generator=g).to(DEV)
    weights = [
        torch.randn(B, C, generator=g).to(DEV),
        torch.randn(B, C * (C - 1) // 2, generator=g).to(DEV),
        torch.randn(B, C, F, generator=g).to(DEV),
    ]
    fus, gfus = run_heads(model, X, "fused", weights)
    tri, gtri = run_heads(model, X, "triton", weights)
    for name, a, b in zip(("logits", "pair_logits", "features"), tri, fus):
        assert a.shape == b.shape and rel(a, b) <= 1e-5, (name, rel(a, b))
    assert set(gtri) == set(gfus)
    scale = max(v.norm().item() for v in gfus.values() if v is not None)
    for name, v in gfus.items():
        assert gtri[name] is not None, name
        # exact-zero gradients (softmax-shift biases) must stay ~0; the rest match relatively
        err = (gtri[name] - v).norm().item()
        assert err <= 1e-5 * max(v.norm().item(), 1e-3 * scale), (name, err)


def test_triton_bank_equals_fused():
    model = make_model(4, K=3)
    g = torch.Generator().manual_seed(2)
    bank_f, bank_t = model.bank, make_model(4, K=3).bank
    for step in range(3):
        feats = torch.randn(5, 4, 24, generator=g).to(DEV)
        labels = torch.randint(-1, 2, (5, 4), generator=g).to(DEV)
        bank_f.update(feats, labels, impl="fused")
        bank_t.update(feats, labels, impl="triton")
        assert torch.equal(bank_f.bank, bank_t.bank), step
        sim_f, lab_f = bank_f.pseudo_labels(feats, labels, 0.2, impl="fused")
        sim_t, lab_t = bank_t.pseudo_labels(feats, labels, 0.2, impl="triton")
        assert (sim_f - sim_t).abs().max().item() <= 1e-5
        safe = (sim_f - 0.2).abs() > 1e-4
        assert torch.equal(lab_f[safe], lab_t[safe])


@pytest.mark.slow
def test_bench_smoke_runs(tmp_path):
    # the GPU benchmark script must not rot: its --smoke mode checks and times every kernel on tiny shapes
    from kernels import bench

    assert bench.main(["--smoke", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("kernels-*.json")
    result = json.loads(path.read_text())
    assert result["all_ok"] and {r["kernel"] for r in result["runs"]} == {
        "semantic_attention",
        "pair_cooccurrence",
        "class_cosine_gram",
        "bank_pseudo_labels",
        "bank_update",
    }
