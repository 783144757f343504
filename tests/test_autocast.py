"""The model under bf16 autocast (the GPU training recipe) runs in every impl and stays close to
its float32 result; checked on the CPU's autocast, which casts the same ops to bf16."""

import pytest
import torch

from sst_dist.model import ModelConfig, SSTModel, cooccurrence_adjacency


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_bf16_autocast_matches_fp32(impl):
    torch.manual_seed(0)
    C = 7
    cfg = ModelConfig(num_classes=C, backbone="resnet18", feature_dim=32, inter_dim=16, out_dim=24,
                      embed_dim=8, bank_size=4, impl=impl)
    model = SSTModel(cfg, cooccurrence_adjacency(torch.randint(-1, 2, (30, C)))).eval()
    X = torch.randn(3, 5, 32)
    ref = model.heads(X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.heads(X)
    for name, a, b in zip(("logits", "pair_logits", "features"), out, ref):
        assert torch.isfinite(a).all(), name
        scale = b.abs().max().clamp_min(1e-3)
        assert (a.float() - b).abs().max() / scale < 5e-2, name  # bf16 keeps ~3 significant digits
    sum(o.float().sum() for o in out).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
