"""Import a checkpoint of the reference SST code (HCP-MLR-PL, model/SST.py) into SSTModel's layout.

The reference module names map one to one onto ours; the adjacency and GloVe embeddings it kept as
frozen parameters become our buffers. Sizes (classes, widths, ResNet depth) are inferred from the
tensors. Also provides the ``sst-dist convert-checkpoint IN OUT`` subcommand.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from typing import Any

import torch

from data_shards.safe_io import UnsafePathError, atomic_write_bytes
from sst_dist.safe_load import load_tensors

# reference prefix -> our prefix (longest match first where prefixes nest)
_PREFIXES: list[tuple[str, str]] = [
    ("changeChannel.0.", "backbone.reduce."),
    ("changeChannel.1.", "backbone.reduce_bn."),
    ("backbone.", "backbone.trunk."),
    ("SemanticDecoupling.", "decoupling."),
    ("GraphNeuralNetwork.fc_1_w.", "gnn.w_z."),
    ("GraphNeuralNetwork.fc_1_u.", "gnn.u_z."),
    ("GraphNeuralNetwork.fc_2_w.", "gnn.w_r."),
    ("GraphNeuralNetwork.fc_2_u.", "gnn.u_r."),
    ("GraphNeuralNetwork.fc_3_w.", "gnn.w_h."),
    ("GraphNeuralNetwork.fc_3_u.", "gnn.u_h."),
    ("intra_classifiers.", "pairs.classifier."),
    ("intra_fc_1.", "pairs.fc1."),
    ("intra_fc_2.", "pairs.fc2."),
    ("intra_fc_3.", "pairs.fc3."),
    ("classifiers.", "classifier."),
    ("fc.", "out_fc."),
]
_EXACT = {"wordFeatures": "label_embeddings", "inMatrix": "adj_in", "outMatrix": "adj_out"}
# The reference's GatedGNN also registers the two matrices; they duplicate the top-level ones.
_DUPLICATES = ("GraphNeuralNetwork.inMatrix", "GraphNeuralNetwork.outMatrix")
# (bottleneck blocks?, blocks per stage) -> our backbone name
_DEPTHS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}
_REQUIRED = (
    "wordFeatures",
    "inMatrix",
    "outMatrix",
    "changeChannel.0.weight",
    "SemanticDecoupling.fc1.weight",
    "SemanticDecoupling.fc4.weight",
    "fc.weight",
    "classifiers.weight",
    "intra_fc_1.weight",
    "intra_classifiers.weight",
    "backbone.conv1.weight",
)


def _read(
    path_or_dict: str | os.PathLike | dict, trust_pickle: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    meta: dict[str, Any] = {}
    if isinstance(path_or_dict, dict):
        obj: Any = path_or_dict
    else:
        path = os.fspath(path_or_dict)
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a reference checkpoint file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference checkpoint not found: {path!r}")
        obj = load_tensors(path, trust=trust_pickle)
        meta["source"] = path
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "model_config" in obj:
        raise ValueError(
            f"{meta.get('source', 'the input')} is already converted (an SST-Dist model file): "
            "give it to eval or predict as it is"
        )
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        for key in ("epoch", "best_mAP"):
            if key in obj:
                meta[key] = float(obj[key]) if key == "best_mAP" else int(obj[key])
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError("reference checkpoint must be a state dict (or {'state_dict': ...}) of tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj), meta


def _backbone_name(sd: dict[str, torch.Tensor]) -> str:
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in sd if (m := re.match(rf"backbone\.layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    bottleneck = any(".conv3." in k for k in sd if k.startswith("backbone.layer"))
    name = _DEPTHS.get((bottleneck, tuple(blocks)))
    if name is None:
        raise ValueError(
            f"unsupported reference backbone: blocks per stage {blocks}, bottleneck={bottleneck}; "
            f"supported: {sorted(_DEPTHS.values())}"
        )
    return name


def _rename(key: str) -> str | None:
    if key in _EXACT:
        return _EXACT[key]
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def convert_reference_checkpoint(
    path_or_dict: str | os.PathLike | dict, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map a reference SST state dict (or checkpoint file) onto SSTModel's names.

    Returns (state_dict, info). info["model_config"] holds the ModelConfig keyword arguments the
    tensors imply (time_steps is not stored in weights: the reference's 3 is assumed). The result
    lacks only our memory-bank buffers (``bank.*``), which the reference did not checkpoint.
    """
    sd, meta = _read(path_or_dict, trust_pickle)
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"not a reference SST state dict: missing keys {missing}")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _DUPLICATES:
            top = sd.get(key.split(".", 1)[1])
            if top is not None and not torch.equal(torch.nan_to_num(top), torch.nan_to_num(value)):
                raise ValueError(f"{key} differs from {key.split('.', 1)[1]} in the reference checkpoint")
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value.clone()
    if unknown:
        raise ValueError(f"reference checkpoint has keys this converter does not know: {unknown[:10]}")
    nan_rows = int(torch.isnan(out["adj_in"]).any(dim=1).sum())
    for key in ("adj_in", "adj_out"):  # the reference's never-positive classes left NaN rows
        out[key] = torch.nan_to_num(out[key].float(), nan=0.0)
    emb = out["label_embeddings"]
    C = emb.shape[0]
    cfg = {
        "num_classes": C,
        "backbone": _backbone_name(sd),
        "feature_dim": out["backbone.reduce.weight"].shape[0],
        "inter_dim": out["decoupling.fc1.weight"].shape[0],
        "out_dim": out["out_fc.weight"].shape[0],
        "embed_dim": emb.shape[1],
        "time_steps": 3,
    }
    checks = {
        "classifiers.weight rows": (out["classifier.weight"].shape[0], C),
        "intra_classifiers.weight rows": (out["pairs.classifier.weight"].shape[0], C * (C - 1) // 2),
        "inMatrix": (tuple(out["adj_in"].shape), (C, C)),
        "intra_fc_1 output": (out["pairs.fc1.weight"].shape[0], cfg["inter_dim"]),
    }
    for what, (got, want) in checks.items():
        if got != want:
            raise ValueError(f"reference checkpoint: {what} is {got}, expected {want} for {C} classes")
    info = {"model_config": cfg, "nan_adjacency_rows": nan_rows, **meta}
    return out, info


def build_model(state: dict[str, torch.Tensor], info: dict[str, Any], **overrides: Any):
    """An SSTModel carrying the converted weights (embeddings as a frozen buffer, like the reference)."""
    from sst_dist.model.sst import ModelConfig, SSTModel

    cfg = ModelConfig(**{**info["model_config"], **overrides})
    model = SSTModel(cfg, state["adj_in"], embeddings=state["label_embeddings"])
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("bank.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"converted state does not fit SSTModel: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return model


def read_converted(
    path: str | os.PathLike, trust: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """(state dict without the memory bank, model_config or None, info) of a converted file.

    Accepts what ``convert-checkpoint`` writes and a bare state dict of our names (no
    model_config then). Read as tensors only unless ``trust``; one-line errors name the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a converted checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"converted checkpoint {path} does not exist")
    payload = load_tensors(path, trust=trust)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state, model_cfg = payload["model"], payload.get("model_config")
        info = payload.get("info") if isinstance(payload.get("info"), dict) else {}
    elif isinstance(payload, dict) and payload and all(torch.is_tensor(v) for v in payload.values()):
        state, model_cfg, info = payload, None, {}
    else:
        raise ValueError(f"{path}: not a converted SST checkpoint (expected {{'model': state_dict, ...}})")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: its 'model' entry is not a state dict of tensors")
    if model_cfg is not None and not isinstance(model_cfg, dict):
        raise ValueError(f"{path}: 'model_config' is not a mapping")
    # the memory bank is training state (its size is the run's choice), not a weight
    state = {k: v for k, v in state.items() if not k.startswith("bank.")}
    return state, (dict(model_cfg) if model_cfg is not None else None), dict(info)


def load_converted_into(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load a ``convert-checkpoint`` output (or a bare state dict of our names) into ``model``.

    Everything but the memory bank must fit: the official model's adjacency, label embeddings
    and weights replace the fresh model's, so evaluation and fine-tuning start from it exactly.
    A model config that disagrees with the file's in a field that changes outputs is an error.
    Returns the file's ``info`` (empty for a bare state dict).
    """
    from sst_dist.model.config import check_model_agreement

    state, model_cfg, info = read_converted(path)
    if model_cfg is not None and hasattr(model, "cfg"):
        check_model_agreement(model_cfg, model.cfg, where="the run config")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{os.fspath(path)} does not fit the configured model: {_first_lines(e)}") from None
    missing = [k for k in result.missing_keys if not k.startswith("bank.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{os.fspath(path)} does not fit the configured model (check model.* against its model_config "
            f"{model_cfg}): missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    return info


def _first_lines(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return " ".join(lines[1:3] or lines[:1])[:300]


def _run(args: argparse.Namespace) -> int:
    """Convert, prove the result loads, write it (never over an existing file); exit 2 on bad input."""
    try:
        _refuse_existing(args.output)
        try:
            state, info = convert_reference_checkpoint(args.input, trust_pickle=args.trust_checkpoint)
            model = build_model(state, info)  # proves the result loads; fills the (empty) memory bank
        except ValueError as e:  # about IN: make sure the line names it
            raise ValueError(str(e) if args.input in str(e) else f"{args.input}: {e}") from None
        payload = {"model": model.state_dict(), "model_config": info["model_config"], "info": info}
        buf = io.BytesIO()
        torch.save(payload, buf)
        out_dir = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(out_dir, exist_ok=True)
        try:  # exclusive: a file that appeared while converting (another conversion) stays
            atomic_write_bytes(args.output, buf.getvalue(), mode=0o644 & ~_umask(), exclusive=True)
        except FileExistsError:
            _refuse_existing(args.output)
            raise
    except (FileNotFoundError, ValueError, UnsafePathError, OSError) as e:
        print(f"sst-dist convert-checkpoint: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.output}: {info['model_config']} "
        f"(NaN adjacency rows zeroed: {info['nan_adjacency_rows']})"
    )
    return 0


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise ValueError(f"{path} already exists; choose a new output name (it is never overwritten)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


EXIT_STATUSES = """exit status:
  0  converted; OUT holds {'model': state_dict, 'model_config': {...}, 'info': {...}} (mode 0644)
  2  bad input: missing or unreadable IN, IN not a torch checkpoint (checked before anything is
     unpickled, with or without --trust-checkpoint), pickled objects without
     --trust-checkpoint, not a reference SST state dict, or OUT already exists (one line on
     stderr naming the file)"""


def register(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sst-dist convert-checkpoint IN OUT``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES
    parser.add_argument("input", help="reference checkpoint (.pth with 'state_dict', or a bare state dict)")
    parser.add_argument(
        "output", help="output file: {'model': state_dict, 'model_config': {...}, 'info': {...}}"
    )
    parser.add_argument(
        "--trust-checkpoint",
        "--trust-pickle",
        dest="trust_checkpoint",
        action="store_true",
        help="allow arbitrary pickled objects in the input (they can run code: only for files you trust)",
    )
    parser.set_defaults(func=_run)
