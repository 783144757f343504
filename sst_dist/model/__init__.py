"""The SST model (DESIGN §2): backbone, semantic decoupling, gated GNN, classifier, pair head.

Public API (docs/architecture.md "Model API"): ModelConfig, SSTModel, SSTOutput,
cooccurrence_adjacency. Submodules import lazily so that ``sst_dist.model.bank`` and friends can be
used without pulling in torchvision.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ModelConfig", "SSTModel", "SSTOutput", "cooccurrence_adjacency"]


def __getattr__(name: str) -> Any:
    if name == "ModelConfig":
        from sst_dist.model.config import ModelConfig

        return ModelConfig
    if name in ("SSTModel", "SSTOutput"):
        from sst_dist.model import sst

        return getattr(sst, name)
    if name == "cooccurrence_adjacency":
        from sst_dist.model.adjacency import cooccurrence_adjacency

        return cooccurrence_adjacency
    raise AttributeError(f"module 'sst_dist.model' has no attribute {name!r}")
