"""ResNet trunk + SST neck (2x2 avg pool, 1x1 conv, BatchNorm) producing the feature map X (B,S,F).

The trunk uses torchvision's layout and parameter names (``trunk.conv1.weight``,
``trunk.layer4.2.bn3.running_var``...), so torchvision state-dict files load into it unchanged.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

from sst_dist.model.config import BACKBONES, FREEZE_POLICIES

_TRUNK_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _torchvision_state_dict(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    """Read trunk weights from a file path or a torchvision weight name (e.g. IMAGENET1K_V1)."""
    _, enum_name, _ = BACKBONES[name]
    looks_like_file = os.path.sep in pretrained or pretrained.endswith((".pth", ".pt", ".bin"))
    if looks_like_file or os.path.exists(pretrained):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained weights file for {name} not found: {pretrained!r}")
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt file, pickle with objects, ...
            raise ValueError(f"cannot read pretrained weights file {pretrained!r}: {exc}") from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"pretrained weights file {pretrained!r} does not hold a state dict")
        return state
    enum = getattr(torchvision.models, enum_name)
    valid = [w.name for w in enum]
    if pretrained not in valid:
        raise ValueError(
            f"pretrained={pretrained!r} is neither an existing file nor a torchvision weight name "
            f"for {name}; valid names: {valid}"
        )
    weights = enum[pretrained]
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise RuntimeError(
            f"could not obtain torchvision weights {enum_name}.{pretrained} for {name} ({exc}). "
            f"Without network access, download {weights.url} elsewhere and pass its local path as "
            "`pretrained` (a torchvision state-dict file), or place it in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints)."
        ) from exc


class Backbone(nn.Module):
    """ResNet to layer4, 2x2/stride-2 avg pool, 1x1 conv (no bias) + BatchNorm; returns (B,S,F)."""

    def __init__(
        self,
        name: str = "resnet101",
        feature_dim: int = 1024,
        pretrained: str | None = None,
        freeze: str = "layer4",
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
        if freeze not in FREEZE_POLICIES:
            raise ValueError(f"freeze must be one of {FREEZE_POLICIES}, got {freeze!r}")
        builder, _, channels = BACKBONES[name]
        net = getattr(torchvision.models, builder)(weights=None)
        self.trunk = nn.Sequential(OrderedDict((part, getattr(net, part)) for part in _TRUNK_PARTS))
        self.pool = nn.AvgPool2d(2, stride=2)
        self.reduce = nn.Conv2d(channels, feature_dim, kernel_size=1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(feature_dim)
        self.name, self.freeze, self.channels, self.feature_dim = name, freeze, channels, feature_dim
        if pretrained is not None:
            self.load_trunk(pretrained)
        self._apply_freeze()

    def load_trunk(self, pretrained: str) -> None:
        """Strictly load torchvision-format trunk weights (the classifier ``fc.*`` is ignored)."""
        state = _torchvision_state_dict(self.name, pretrained)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = [], []
        try:
            result = self.trunk.load_state_dict(state, strict=False)
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        except RuntimeError as exc:  # shape mismatch
            raise ValueError(
                f"pretrained weights {pretrained!r} do not fit a {self.name} trunk: {exc}"
            ) from exc
        if missing or unexpected:
            raise ValueError(
                f"pretrained weights {pretrained!r} do not match a {self.name} trunk: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )

    def _apply_freeze(self) -> None:
        if self.freeze == "layer4":
            for part_name, part in self.trunk.named_children():
                for p in part.parameters():
                    p.requires_grad_(part_name == "layer4")
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        """Like nn.Module.train, but with freeze="layer4" every trunk BatchNorm stays in eval mode."""
        super().train(mode)
        if self.freeze == "layer4":
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.reduce_bn(self.reduce(self.pool(self.trunk(images))))
        return x.flatten(2).transpose(1, 2)  # (B, S=h*w row-major, F)
