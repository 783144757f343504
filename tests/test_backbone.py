"""Backbone: output layout, weights loading (file / torchvision name), freeze policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
import torchvision

from sst_dist.model.backbone import Backbone


def test_output_shape_and_spatial_order():
    torch.manual_seed(0)
    bb = Backbone("resnet18", feature_dim=10, freeze="none").eval()
    images = torch.randn(2, 3, 128, 192)
    X = bb(images)
    assert X.shape == (2, 2 * 3, 10)  # 128/32=4 -> 2, 192/32=6 -> 3 after the 2x2/2 pool
    # independent recomputation with torchvision's own resnet18 carrying the same trunk weights
    net = torchvision.models.resnet18(weights=None).eval()
    net.load_state_dict({**bb.trunk.state_dict(), **{k: v for k, v in net.state_dict().items() if "fc" in k}})
    x = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(images))))))))
    x = Fn.avg_pool2d(x, 2, 2)
    x = Fn.conv2d(x, bb.reduce.weight)
    bn = bb.reduce_bn
    x = Fn.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    expected = torch.stack([x[:, :, r, c] for r in range(2) for c in range(3)], dim=1)  # s = 3 r + c
    assert torch.allclose(X, expected, atol=1e-5)


def test_freeze_layer4_policy_with_frozen_trunk_bn():
    torch.manual_seed(0)
    bb = Backbone("resnet18", feature_dim=8, freeze="layer4", trunk_bn="frozen")  # the fully frozen variant
    for name, p in bb.named_parameters():
        assert p.requires_grad == (name.startswith("trunk.layer4.") or not name.startswith("trunk.")), name
    bb.train()
    trunk_bns = [m for m in bb.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert trunk_bns and not any(m.training for m in trunk_bns)
    assert bb.reduce_bn.training and bb.trunk.layer4.training
    before = {k: v.clone() for k, v in bb.trunk.state_dict().items() if "running" in k}
    X = bb(torch.randn(2, 3, 64, 64))
    X.square().sum().backward()
    after = bb.trunk.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # frozen statistics
    assert bb.trunk.layer4[0].conv1.weight.grad is not None
    assert bb.trunk.layer3[0].conv1.weight.grad is None and bb.trunk.conv1.weight.grad is None
    assert bb.reduce.weight.grad is not None


def test_freeze_none_trains_everything():
    bb = Backbone("resnet18", feature_dim=8, freeze="none").train()
    assert all(p.requires_grad for p in bb.parameters())
    assert all(m.training for m in bb.modules())


def test_load_trunk_from_file(tmp_path):
    torch.manual_seed(1)
    src = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)  # torchvision format, classifier fc.* included
    bb = Backbone("resnet18", feature_dim=8, pretrained=str(path))
    for k, v in bb.trunk.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="r34.pth.*resnet18"):
        Backbone("resnet18", pretrained=str(wrong))
    partial = tmp_path / "partial.pth"
    sd = torchvision.models.resnet18(weights=None).state_dict()
    del sd["layer2.0.conv1.weight"]
    torch.save(sd, partial)
    with pytest.raises(ValueError, match="partial.pth.*missing.*layer2.0.conv1.weight"):
        Backbone("resnet18", pretrained=str(partial))
    with pytest.raises(ValueError, match="IMAGENET9K.*valid names"):
        Backbone("resnet18", pretrained="IMAGENET9K")
    with pytest.raises(ValueError, match="backbone"):
        Backbone("resnet152")


def test_torchvision_weight_name_offline_gives_clear_error(tmp_path, monkeypatch):
    """Simulate the offline machine (the network fetch fails) and check the message."""
    import torchvision.models._api as api

    def offline(url, *args, **kwargs):
        raise OSError(f"network unreachable: {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"ResNet18_Weights\.IMAGENET1K_V1.*local path"):
        Backbone("resnet18", pretrained="IMAGENET1K_V1")


def test_smoke_command_runs_forward_backward(capsys):
    from sst_dist.cli import main

    assert main(["smoke", "--classes", "4", "--batch-size", "2", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "smoke: OK" in out and "grad_norm" in out
