"""The two bf16 recipes of the trainer, one real DeepSpeed step each (CPU accelerator here).

``bf16``: DeepSpeed's bf16 mode, bf16 weights with an fp32 master copy in its BF16 optimizer.
``bf16-autocast``: fp32 weights and a plain fp32 Adam, bf16 matmuls under torch.autocast inside
the engine's forward. Both must train (finite loss, moved weights) with the dtypes they promise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from sst_dist.config import load_config

DEBUG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "debug.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_bf16_recipes_train_with_their_dtypes(tmp_path, precision):
    from sst_dist.train.trainer import Trainer

    os.environ["DS_ACCELERATOR"] = "cpu"
    cfg = load_config(
        DEBUG,
        [
            f"output.root={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'data'}",
            f"train.precision={precision}",
        ],
    )
    tr = Trainer(cfg)
    weight = tr.model.out_fc.weight
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert weight.dtype == want
    assert tr.engine.torch_autocast_enabled() == (precision == "bf16-autocast")

    seen: list[torch.dtype] = []
    hook = tr.model.out_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = weight.detach().float().clone()
    tr._set_train_mode()
    batch = next(iter(tr.data.train_loader))
    # the loader delivers the images in the dtype the step feeds the trunk (no second cast)
    assert batch.images.dtype == want == tr.dtype
    assert next(iter(tr.data.test_loader)).images.dtype == want
    res = tr.train_step(batch, epoch=1, progress=0.0)
    hook.remove()
    assert math.isfinite(res.global_loss) and tr.global_step == 1
    assert seen == [torch.bfloat16]  # a Linear computes in bf16 in both recipes
    assert not torch.equal(weight.detach().float(), before)
    assert weight.dtype == want


@pytest.mark.gpu
def test_cuda_trainer_runs_the_trunk_channels_last(tmp_path):
    """On CUDA the images and the conv weights are channels-last (issue 12); the step still trains."""
    from sst_dist.train.trainer import Trainer

    os.environ.pop("DS_ACCELERATOR", None)
    cfg = load_config(DEBUG, [f"output.root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"])
    tr = Trainer(cfg)
    conv = next(m for m in tr.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_cuda and conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen: list[bool] = []
    cl = torch.channels_last
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=cl)))
    tr._set_train_mode()
    res = tr.train_step(next(iter(tr.data.train_loader)), epoch=1, progress=0.0, sync=True)
    hook.remove()
    assert seen == [True] and math.isfinite(res.global_loss)
