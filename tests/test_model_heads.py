"""Fused SST heads vs the literal reference: outputs and every gradient; kernels vs direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.torch_decoupling import semantic_attention_torch
from kernels.torch_pairs import pair_cooccurrence_torch
from sst_dist.model import ModelConfig, SSTModel, cooccurrence_adjacency
from sst_dist.model.ggnn import GatedGNN

# Parameters whose true gradient is exactly zero (a constant shift of the softmax scores): the
# reference gets rounding noise there, the fused form an exact zero.
SHIFT_ONLY = {"decoupling.fc3.bias", "decoupling.fc4.bias"}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_model(C, F=16, H=8, D=12, E=6, dtype=torch.float64, seed=0, learned=True):
    torch.manual_seed(seed)
    adj = cooccurrence_adjacency(torch.randint(-1, 2, (40, C)))
    cfg = ModelConfig(num_classes=C, backbone="resnet18", feature_dim=F, inter_dim=H, out_dim=D, embed_dim=E)
    emb = None if learned else torch.randn(C, E + 1)
    return SSTModel(cfg, adj, embeddings=emb).to(dtype)


def run_heads(model, X, impl, weights):
    model.impl = impl
    model.zero_grad(set_to_none=True)
    X = X.detach().clone().requires_grad_(True)
    out = model.heads(X)
    loss = sum((o * w).sum() for o, w in zip(out, weights))
    loss.backward()
    heads = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    grads = {n: p.grad for n, p in heads}
    grads["X"] = X.grad
    return out, grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item() if b.norm() > 0 else a.norm().item()


def check_equal(model, B, S, dtype, device="cpu"):
    C, F = model.cfg.num_classes, model.cfg.feature_dim
    X = torch.randn(B, S, F, dtype=dtype, device=device)
    weights = [torch.randn(B, C, dtype=dtype, device=device),
               torch.randn(B, C * (C - 1) // 2, dtype=dtype, device=device),
               torch.randn(B, C, F, dtype=dtype, device=device)]
    ref, gref = run_heads(model, X, "reference", weights)
    fus, gfus = run_heads(model, X, "fused", weights)
    tol = TOL[dtype]
    for name, a, b in zip(("logits", "pair_logits", "features"), fus, ref):
        assert a.shape == b.shape and a.dtype == dtype
        assert rel(a, b) <= tol, (name, rel(a, b))
    assert set(gref) == set(gfus)
    scale = max(g.norm().item() for g in gref.values() if g is not None)
    for name, g in gref.items():
        if name in SHIFT_ONLY:
            assert gfus[name] is not None and gfus[name].abs().max() == 0, name
            assert g.norm() <= tol * scale, (name, g.norm())
            continue
        assert g is not None and gfus[name] is not None, name
        assert rel(gfus[name], g) <= tol, (name, rel(gfus[name], g))


@pytest.mark.parametrize(
    "C,S,B", [(3, 1, 3), (7, 5, 1), (20, 49, 3), (80, 5, 8), (80, 49, 1)]
)
def test_fused_equals_reference_float64(C, S, B):
    check_equal(make_model(C, learned=C % 2 == 0), B, S, torch.float64)


@pytest.mark.parametrize("C,S,B", [(7, 5, 3), (20, 49, 8)])
def test_fused_equals_reference_float32(C, S, B):
    check_equal(make_model(C, learned=False, dtype=torch.float32), B, S, torch.float32)


@pytest.mark.slow
def test_fused_float32_as_accurate_as_reference_at_coco_dims():
    """At COCO widths a few relu arguments in the pair head sit within float32 rounding of zero, so
    reference and fused float32 gradients differ by ~1e-4 there; both are judged against float64."""
    model = make_model(80, F=1024, H=512, D=1024, E=300, dtype=torch.float32)
    B, S, C, F = 1, 8, 80, 1024
    X = torch.randn(B, S, F)
    weights = [torch.randn(B, C), torch.randn(B, C * (C - 1) // 2), torch.randn(B, C, F)]
    ref32, gref32 = run_heads(model, X, "reference", weights)
    fus32, gfus32 = run_heads(model, X, "fused", weights)
    model.double()
    truth, gtruth = run_heads(model, X.double(), "reference", [w.double() for w in weights])
    for a, b, t in zip(fus32, ref32, truth):
        assert rel(a.double(), t) <= max(1e-5, 3 * rel(b.double(), t))
    for name, t in gtruth.items():
        if name in SHIFT_ONLY:
            continue
        # Upstream of the pair relu, which float32 relu arguments land on the wrong side of zero
        # depends on the CPU's summation order: CI's machine measured 4.9e-4 on pairs.fc1.weight
        # where ours gives 6e-5. A wrong or dropped term gives errors of order 1.
        floor = 1e-3 if name.startswith(("pairs.fc1.", "pairs.fc2.")) else 1e-5
        assert rel(gfus32[name].double(), t) <= max(floor, 3 * rel(gref32[name].double(), t)), name


@pytest.mark.gpu
def test_fused_equals_reference_on_cuda():
    check_equal(make_model(20, dtype=torch.float64).cuda(), 3, 49, torch.float64, device="cuda")


def saved_bytes(model, X, impl):
    """Bytes of distinct non-parameter storages autograd keeps for backward."""
    model.impl = impl
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.heads(X)
    sum(o.sum() for o in out).backward()
    return seen


def test_fused_saves_far_less_for_backward():
    B, S, C, F, H, D = 4, 49, 20, 32, 64, 128
    model = make_model(C, F=F, H=H, D=D, dtype=torch.float32)
    X = torch.randn(B, S, F)
    ref, fused = saved_bytes(model, X, "reference"), saved_bytes(model, X, "fused")
    assert sum(fused.values()) * 3 <= sum(ref.values()), (fused, ref)
    # nothing near the size of the (B,S,C,H) attention slab or a (B,P,D) pair tensor is kept
    assert max(fused.values()) * 3 <= min(B * S * C * H, B * (C * (C - 1) // 2) * D) * 4


def test_impl_switch_and_validation():
    model = make_model(4)
    with pytest.raises(ValueError, match="impl"):
        model.impl = "cuda"
    with pytest.raises(ValueError, match="feature_dim=16"):
        model.heads(torch.randn(2, 3, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        model(torch.randn(3, 32, 32, dtype=torch.float64))
    # values are not checked in forward (that would sync the host every step): a non-finite image
    # gives non-finite logits for that image only, which the training step detects and skips
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    img[0, 1, 2, 3] = float("nan")
    logits = model.eval()(img).logits
    assert not torch.isfinite(logits[0]).any() and torch.isfinite(logits[1]).all()


def test_model_construction_errors(tmp_path):
    cfg = ModelConfig(num_classes=4, backbone="resnet18", feature_dim=8, inter_dim=4, out_dim=8)
    with pytest.raises(ValueError, match=r"adjacency.*\(4, 4\).*\(3, 3\)"):
        SSTModel(cfg, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"embeddings.*num_classes=4.*\(5, 7\)"):
        SSTModel(cfg, torch.zeros(4, 4), embeddings=np.zeros((5, 7)))
    bad = torch.zeros(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SSTModel(cfg, bad)
    path = tmp_path / "emb.npy"
    np.save(path, np.random.default_rng(0).normal(size=(4, 9)).astype(np.float32))
    model = SSTModel(ModelConfig(num_classes=4, backbone="resnet18", feature_dim=8, embeddings=str(path)),
                     torch.eye(4))
    assert "label_embeddings" in dict(model.named_buffers())
    assert model.decoupling.fc2.in_features == 9 and model.bank.bank.shape == (4, 100, 8)


@pytest.mark.parametrize(
    "key,value",
    [("num_classes", 1), ("backbone", "vgg16"), ("impl", "cuda"), ("freeze", "all"),
     ("feature_dim", 0), ("out_dim", -3), ("time_steps", 0), ("embeddings", "/no/such/file.npy")],
)
def test_config_validation_names_the_key(key, value):
    kwargs = {"num_classes": 5, key: value}
    with pytest.raises(ValueError, match=f"ModelConfig.{key}"):
        ModelConfig(**kwargs)


# ---------------------------------------------------------------- kernels vs the direct formulas
def attention_direct(U, V, a, X):
    score = (torch.tanh(U[:, :, None, :] * V[None, None]) * a).sum(-1)  # (B,S,C)
    return torch.einsum("bsc,bsf->bcf", torch.softmax(score, dim=1), X)


def pairs_direct(U, V, A, beta, c):
    C = U.shape[1]
    i, j = torch.triu_indices(C, C, 1)
    return (torch.relu(U[:, i] + V[:, j] + beta) * A).sum(-1) + c


def grads_of(fn, inputs, w):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("chunk", [1, 7, 10**9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_kernel_matches_direct(chunk, dtype):
    g = torch.Generator().manual_seed(1)
    B, S, C, D, F = 3, 5, 11, 6, 4
    ins = [torch.randn(s, generator=g, dtype=dtype) for s in ((B, S, D), (C, D), (D,), (B, S, F))]
    w = torch.randn(B, C, F, generator=g, dtype=dtype)
    out, grads = grads_of(lambda *t: semantic_attention_torch(*t, chunk_elements=chunk * B * S * D), ins, w)
    ref, rgrads = grads_of(attention_direct, ins, w)
    assert rel(out, ref) <= TOL[dtype]
    for a, b in zip(grads, rgrads):
        assert rel(a, b) <= TOL[dtype]


@pytest.mark.parametrize("chunk", [1, 4, 10**9])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pair_kernel_matches_direct(chunk, dtype):
    g = torch.Generator().manual_seed(2)
    B, C, D = 3, 9, 5
    P = C * (C - 1) // 2
    ins = [torch.randn(s, generator=g, dtype=dtype) for s in ((B, C, D), (B, C, D), (P, D), (D,), (P,))]
    w = torch.randn(B, P, generator=g, dtype=dtype)
    out, grads = grads_of(lambda *t: pair_cooccurrence_torch(*t, chunk_elements=chunk * B * D), ins, w)
    ref, rgrads = grads_of(pairs_direct, ins, w)
    assert rel(out, ref) <= TOL[dtype]
    for a, b in zip(grads, rgrads):
        assert rel(a, b) <= TOL[dtype]


def test_kernels_gradcheck_float64():
    g = torch.Generator().manual_seed(3)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(
        lambda *t: semantic_attention_torch(*t, chunk_elements=13),
        (rnd(2, 3, 4), rnd(5, 4), rnd(4), rnd(2, 3, 2)),
    )
    assert torch.autograd.gradcheck(
        lambda *t: pair_cooccurrence_torch(*t, chunk_elements=9),
        (rnd(2, 4, 3), rnd(2, 4, 3), rnd(6, 3), rnd(3), rnd(6)),
    )


def test_kernels_partial_requires_grad_and_shape_errors():
    U, a, X = torch.randn(2, 3, 4), torch.randn(4), torch.randn(2, 3, 6)
    V = torch.randn(5, 4, requires_grad=True)
    semantic_attention_torch(U, V, a, X).sum().backward()
    assert V.grad is not None and V.grad.shape == (5, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        semantic_attention_torch(U, torch.randn(5, 3), a, X)
    with pytest.raises(ValueError, match=r"A \(6,3\)"):
        pair_cooccurrence_torch(torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(5, 3), torch.randn(3),
                                torch.randn(6))


# ---------------------------------------------------------------- adjacency and graph network
def test_adjacency_hand_worked():
    y = torch.tensor([[1, 1, 0, -1], [1, -1, 0, 0], [1, 1, -1, 0], [0, 1, 0, -1]])
    M = cooccurrence_adjacency(y)
    expected = torch.tensor(
        [[1, 2 / 3, 0, 0], [2 / 3, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32
    )
    assert torch.allclose(M, expected) and M.dtype == torch.float32
    assert torch.equal(cooccurrence_adjacency(y.numpy().astype(np.float64)), M)


def test_adjacency_matches_loop_and_rejects_bad_values():
    y = np.random.default_rng(0).choice([-1, 0, 1], size=(50, 6))
    y[:, 4] = np.minimum(y[:, 4], 0)  # class 4 never known positive
    M = np.zeros((6, 6))
    for row in y:
        for i in np.flatnonzero(row == 1):
            for j in np.flatnonzero(row == 1):
                M[i, j] += 1
    for i in range(6):
        M[i] = M[i] / M[i, i] if M[i, i] > 0 else 0
    assert np.allclose(cooccurrence_adjacency(y).numpy(), M)
    with pytest.raises(ValueError, match="only 1, 0, -1"):
        cooccurrence_adjacency(np.array([[1, 2]]))
    with pytest.raises(ValueError, match="2-D"):
        cooccurrence_adjacency(np.array([1, 0]))


def test_ggnn_matches_per_node_loop():
    torch.manual_seed(4)
    B, C, F = 2, 4, 3
    gnn = GatedGNN(F, time_steps=2).double()
    M = torch.rand(C, C, dtype=torch.float64)
    h0 = torch.randn(B, C, F, dtype=torch.float64)
    out = gnn(h0, M, M.t())
    h = h0.clone()
    for _ in range(2):
        new = torch.empty_like(h)
        for b in range(B):
            for c in range(C):
                m_in = sum(M[c, k] * h[b, k] for k in range(C))
                m_out = sum(M[k, c] * h[b, k] for k in range(C))
                m = torch.cat([m_in, m_out])
                z = torch.sigmoid(gnn.w_z(m) + gnn.u_z(h[b, c]))
                r = torch.sigmoid(gnn.w_r(m) + gnn.u_r(h[b, c]))
                hh = torch.tanh(gnn.w_h(m) + gnn.u_h(r * h[b, c]))
                new[b, c] = (1 - z) * h[b, c] + z * hh
        h = new
    assert torch.allclose(out, h, atol=1e-12)
