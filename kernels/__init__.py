"""Fused head kernels for SST: PyTorch fused forms and Triton kernels behind one dispatch point.

This package imports nothing from ``sst_dist`` or ``data_shards``.
"""

from kernels.dispatch import (
    BACKENDS,
    bank_pseudo_labels,
    bank_update,
    class_cosine_gram,
    pair_cooccurrence,
    semantic_attention,
)

__all__ = [
    "BACKENDS",
    "bank_pseudo_labels",
    "bank_update",
    "class_cosine_gram",
    "pair_cooccurrence",
    "semantic_attention",
]
