"""The model's hyper-parameters (DESIGN §2) and the names they may take, with no torch import.

Kept apart from ``sst_dist.model.sst`` so that ``sst_dist.config`` can validate a run config
(and report a typo) in a fraction of a second, without importing torch or torchvision.
``sst_dist.model.sst`` and ``sst_dist.config`` re-export :class:`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

# backbone name -> (torchvision builder name, weights enum name, trunk output channels)
BACKBONES: dict[str, tuple[str, str, int]] = {
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "resnet101": ("resnet101", "ResNet101_Weights", 2048),
}
FREEZE_POLICIES = ("layer4", "none")
# how the heads are computed: DESIGN literally, fused PyTorch forms, Triton kernels
IMPLS = ("reference", "fused", "triton")


@dataclass
class ModelConfig:
    """Model hyper-parameters (DESIGN §2); validates itself on construction."""

    num_classes: int
    backbone: str = "resnet101"
    pretrained: str | None = None  # None (random), a torchvision state-dict file, or e.g. "IMAGENET1K_V1"
    freeze: str = "layer4"  # "layer4": train only layer4 of the trunk, trunk BatchNorms in eval mode
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
        for key in ("feature_dim", "inter_dim", "out_dim", "embed_dim", "time_steps", "bank_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise bad(key, "must be a positive integer")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise bad("pretrained", "must be None, a file path or a torchvision weight name")
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
