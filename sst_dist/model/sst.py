"""The SST model: backbone -> semantic decoupling -> gated GNN -> classifier, plus the pair head.

``SSTModel.heads(X)`` is everything after the backbone; ``impl`` switches the decoupling and pair
head between the literal reference form and the fused kernels without touching the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from sst_dist.model.backbone import Backbone
from sst_dist.model.bank import MemoryBank
from sst_dist.model.config import IMPLS, ModelConfig
from sst_dist.model.decoupling import SemanticDecoupling
from sst_dist.model.ggnn import GatedGNN
from sst_dist.model.pairs import ElementwiseLinear, PairHead


class SSTOutput(NamedTuple):
    logits: torch.Tensor  # (B,C)
    pair_logits: torch.Tensor  # (B,P), pairs i<j row-major
    features: torch.Tensor  # (B,C,F) class-specific features f


def _load_embeddings(cfg: ModelConfig, embeddings: Any) -> torch.Tensor | None:
    if embeddings is None and cfg.embeddings is None:
        return None
    source = "embeddings argument" if embeddings is not None else f"embeddings file {cfg.embeddings!r}"
    if embeddings is None:
        try:
            embeddings = np.load(cfg.embeddings)
        except Exception as exc:
            raise ValueError(f"cannot read {source}: {exc}") from exc
    emb = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
    if emb.dim() != 2 or emb.shape[0] != cfg.num_classes or emb.shape[1] < 1:
        raise ValueError(f"{source} must be (num_classes={cfg.num_classes}, E); got shape {tuple(emb.shape)}")
    emb = emb.to(torch.float32)
    if not torch.isfinite(emb).all():
        raise ValueError(f"{source} contains NaN or inf")
    return emb


class SSTModel(nn.Module):
    """SST (AAAI 2022) with switchable head implementations; see docs/architecture.md."""

    def __init__(self, cfg: ModelConfig, adjacency: Any, embeddings: Any = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, F = cfg.num_classes, cfg.feature_dim
        adj = torch.as_tensor(np.asarray(adjacency) if not torch.is_tensor(adjacency) else adjacency)
        if adj.shape != (C, C):
            raise ValueError(
                f"adjacency must be (num_classes, num_classes) = ({C}, {C}); got {tuple(adj.shape)}"
            )
        adj = adj.to(torch.float32)
        if not torch.isfinite(adj).all():
            raise ValueError("adjacency contains NaN or inf (build it with cooccurrence_adjacency)")
        self.register_buffer("adj_in", adj.clone())
        self.register_buffer("adj_out", adj.t().contiguous())

        emb = _load_embeddings(cfg, embeddings)
        if emb is None:
            self.label_embeddings = nn.Parameter(torch.randn(C, cfg.embed_dim) * 0.5)
        else:
            self.register_buffer("label_embeddings", emb)
        E = self.label_embeddings.shape[1]

        self.backbone = Backbone(cfg.backbone, F, cfg.pretrained, cfg.freeze, cfg.trunk_bn)
        self.decoupling = SemanticDecoupling(F, E, cfg.inter_dim)
        self.gnn = GatedGNN(F, cfg.time_steps)
        self.out_fc = nn.Linear(2 * F, cfg.out_dim)
        self.classifier = ElementwiseLinear(C, cfg.out_dim)
        self.pairs = PairHead(C, F, cfg.inter_dim, cfg.out_dim)
        self.bank = MemoryBank(C, cfg.bank_size, F)
        self.impl = cfg.impl

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value == "auto":
            from kernels.dispatch import default_impl

            value = default_impl()
        if value not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    @property
    def num_pairs(self) -> int:
        return self.pairs.num_pairs

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) -> feature map X (B,S,F).

        Values are not checked here (a host synchronisation per step): non-finite images give
        non-finite outputs, which the training step detects on the device and skips."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B,3,H,W); got shape {tuple(images.shape)}")
        return self.backbone(images)

    def heads(self, X: torch.Tensor) -> SSTOutput:
        """Everything after the backbone: X (B,S,F) -> SSTOutput."""
        F = self.cfg.feature_dim
        if X.dim() != 3 or X.shape[2] != F:
            raise ValueError(f"X must be (B,S,feature_dim={F}); got shape {tuple(X.shape)}")
        f = self.decoupling(X, self.label_embeddings, self.impl)  # (B,C,F)
        h = self.gnn(f, self.adj_in, self.adj_out)
        o = torch.tanh(self.out_fc(torch.cat((h, f), dim=-1)))  # (B,C,out_dim)
        logits = self.classifier(o)
        pair_logits = self.pairs(f, self.impl)
        return SSTOutput(logits, pair_logits, f)

    def forward(self, images: torch.Tensor) -> SSTOutput:
        return self.heads(self.backbone_features(images))
