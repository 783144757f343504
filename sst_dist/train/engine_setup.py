"""Building the DeepSpeed engine of a run: precision, the generated DeepSpeed config, seeding.

Split from :mod:`.trainer` so the trainer reads as the training loop and its run management.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sst_dist.config import RunConfig
from sst_dist.config_schema import deepspeed_section, merge_mappings

# the dtype of weights, buffers and input images (autocast keeps them float32)
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "bf16-autocast": torch.float32,
    "fp16": torch.float16,
}


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: generated from train.* (micro batch, accumulation, ZeRO stage,
    precision, clipping), then the run config's ``deepspeed:`` section merged over it."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # always explicit: DeepSpeed's own default is 1.0, so leaving the key out would clip at 1.0
    # when train.clip_grad=0 promises no clipping
    ds["gradient_clipping"] = float(t.clip_grad)
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "bf16-autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif t.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return merge_mappings(ds, deepspeed_section(cfg.deepspeed))


def save_deepspeed_config(ds: dict[str, Any], run_dir: Path) -> Path:
    """Write the DeepSpeed config the engine got to ``run_dir/ds_config.json`` (atomically), so a
    run shows what its ``deepspeed:`` section and the generated settings added up to."""
    from data_shards.safe_io import atomic_write_text

    path = Path(run_dir) / "ds_config.json"
    atomic_write_text(path, json.dumps(ds, indent=2, sort_keys=True) + "\n")
    return path


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every rank alike)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give floating buffers the training dtype (DeepSpeed casts only parameters).

    BatchNorm running statistics, the GNN adjacency and fixed label embeddings must match the
    half-precision activations; the memory bank stays float32 (cosines of accumulated features).
    """
    for mod_name, mod in model.named_modules():
        for key, buf in list(mod._buffers.items()):
            full = f"{mod_name}.{key}" if mod_name else key
            if buf is not None and buf.is_floating_point() and not full.startswith("bank."):
                mod._buffers[key] = buf.to(dtype)


def place_model(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model`` to ``device``; on CUDA its 4-D weights go channels-last, the layout
    ``prepare_batch`` hands the images in (cuDNN's fast convolution layout; on the CPU it
    measured no faster and stays as is)."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
