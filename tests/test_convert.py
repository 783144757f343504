"""Reference-checkpoint import: names, shapes, inferred config, and identical outputs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as Fn
import torchvision

from sst_dist.cli import main as cli_main
from sst_dist.convert import build_model, convert_reference_checkpoint
from sst_dist.model import ModelConfig, SSTModel

C, F, H, D, E = 5, 12, 6, 10, 7
P = C * (C - 1) // 2


def reference_state_dict(backbone=torchvision.models.resnet18, seed=0):
    """Random tensors under the reference code's module names and shapes (model/SST.py etc.)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    trunk = backbone(weights=None).state_dict()
    sd = {f"backbone.{k}": v for k, v in trunk.items() if not k.startswith("fc.")}
    channels = trunk["fc.weight"].shape[1]
    sd.update(
        {
            "changeChannel.0.weight": r(F, channels, 1, 1),
            "changeChannel.1.weight": 1 + r(F),
            "changeChannel.1.bias": r(F),
            "changeChannel.1.running_mean": r(F),
            "changeChannel.1.running_var": 1 + r(F).abs(),
            "changeChannel.1.num_batches_tracked": torch.tensor(7),
        }
    )
    M = torch.rand(C, C, generator=g)
    M[3] = float("nan")  # the reference's never-positive class
    sd.update(
        {
            "wordFeatures": r(C, E),
            "inMatrix": M,
            "outMatrix": M.t().clone(),
            "GraphNeuralNetwork.inMatrix": M.clone(),
            "GraphNeuralNetwork.outMatrix": M.t().clone(),
        }
    )
    sd.update(
        {
            "SemanticDecoupling.fc1.weight": r(H, F),
            "SemanticDecoupling.fc2.weight": r(H, E),
            "SemanticDecoupling.fc3.weight": r(H, H),
            "SemanticDecoupling.fc3.bias": r(H),
            "SemanticDecoupling.fc4.weight": r(1, H),
            "SemanticDecoupling.fc4.bias": r(1),
        }
    )
    for k in (1, 2, 3):
        sd.update(
            {
                f"GraphNeuralNetwork.fc_{k}_w.weight": r(F, 2 * F),
                f"GraphNeuralNetwork.fc_{k}_w.bias": r(F),
                f"GraphNeuralNetwork.fc_{k}_u.weight": r(F, F),
                f"GraphNeuralNetwork.fc_{k}_u.bias": r(F),
            }
        )
    sd.update(
        {
            "fc.weight": r(D, 2 * F),
            "fc.bias": r(D),
            "classifiers.weight": r(C, D),
            "classifiers.bias": r(C),
            "intra_fc_1.weight": r(H, F),
            "intra_fc_1.bias": r(H),
            "intra_fc_2.weight": r(D, 2 * H),
            "intra_fc_2.bias": r(D),
            "intra_fc_3.weight": r(D, D),
            "intra_fc_3.bias": r(D),
            "intra_classifiers.weight": r(P, D),
            "intra_classifiers.bias": r(P),
        }
    )
    return sd


def literal_heads(sd, X):
    """The reference's computation after the backbone, written out from the raw tensors."""
    M_in, M_out = torch.nan_to_num(sd["inMatrix"]), torch.nan_to_num(sd["outMatrix"])
    U = X @ sd["SemanticDecoupling.fc1.weight"].t()
    V = sd["wordFeatures"] @ sd["SemanticDecoupling.fc2.weight"].t()
    z = torch.tanh(U[:, :, None, :] * V)
    z = Fn.linear(z, sd["SemanticDecoupling.fc3.weight"], sd["SemanticDecoupling.fc3.bias"])
    score = Fn.linear(z, sd["SemanticDecoupling.fc4.weight"], sd["SemanticDecoupling.fc4.bias"])[..., 0]
    f = (torch.softmax(score, dim=1)[..., None] * X[:, :, None, :]).sum(1)  # (B,C,F)
    h = f

    def lin(name, x):
        return Fn.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    for _ in range(3):
        a = torch.cat((M_in @ h, M_out @ h), dim=2)
        gz = torch.sigmoid(lin("GraphNeuralNetwork.fc_1_w", a) + lin("GraphNeuralNetwork.fc_1_u", h))
        gr = torch.sigmoid(lin("GraphNeuralNetwork.fc_2_w", a) + lin("GraphNeuralNetwork.fc_2_u", h))
        hh = torch.tanh(lin("GraphNeuralNetwork.fc_3_w", a) + lin("GraphNeuralNetwork.fc_3_u", gr * h))
        h = (1 - gz) * h + gz * hh
    o = torch.tanh(lin("fc", torch.cat((h, f), dim=2)))
    logits = (o * sd["classifiers.weight"]).sum(2) + sd["classifiers.bias"]
    g = lin("intra_fc_1", f)
    first = [i for i in range(C - 1) for _ in range(i + 1, C)]
    second = [j for i in range(C - 1) for j in range(i + 1, C)]
    q = lin("intra_fc_3", torch.relu(lin("intra_fc_2", torch.cat((g[:, first], g[:, second]), dim=2))))
    q = (q * sd["intra_classifiers.weight"]).sum(2) + sd["intra_classifiers.bias"]
    return logits, q, f


def hand_assigned_model(sd):
    cfg = ModelConfig(num_classes=C, backbone="resnet18", feature_dim=F, inter_dim=H, out_dim=D, embed_dim=E)
    model = SSTModel(cfg, torch.nan_to_num(sd["inMatrix"]), embeddings=sd["wordFeatures"])
    with torch.no_grad():
        for k, v in sd.items():
            if k.startswith("backbone."):
                model.backbone.trunk.state_dict(keep_vars=True)[k[len("backbone.") :]].copy_(v)
        m = model
        pairs = [
            (m.backbone.reduce.weight, "changeChannel.0.weight"),
            (m.decoupling.fc1.weight, "SemanticDecoupling.fc1.weight"),
        ]
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            pairs.append((getattr(m.backbone.reduce_bn, n), f"changeChannel.1.{n}"))
        for n in ("fc2.weight", "fc3.weight", "fc3.bias", "fc4.weight", "fc4.bias"):
            pairs.append((m.decoupling.get_parameter(n), f"SemanticDecoupling.{n}"))
        for k, gate in ((1, "z"), (2, "r"), (3, "h")):
            for side in ("w", "u"):
                lin = getattr(m.gnn, f"{side}_{gate}")
                pairs += [
                    (lin.weight, f"GraphNeuralNetwork.fc_{k}_{side}.weight"),
                    (lin.bias, f"GraphNeuralNetwork.fc_{k}_{side}.bias"),
                ]
        for n in ("weight", "bias"):
            pairs += [
                (getattr(m.out_fc, n), f"fc.{n}"),
                (getattr(m.classifier, n), f"classifiers.{n}"),
                (getattr(m.pairs.fc1, n), f"intra_fc_1.{n}"),
                (getattr(m.pairs.fc2, n), f"intra_fc_2.{n}"),
                (getattr(m.pairs.fc3, n), f"intra_fc_3.{n}"),
                (getattr(m.pairs.classifier, n), f"intra_classifiers.{n}"),
            ]
        for tensor, key in pairs:
            tensor.copy_(sd[key])
    return model.eval()


def test_converted_model_matches_hand_assigned_and_literal(tmp_path):
    sd = reference_state_dict()
    path = tmp_path / "Checkpoint_Best.pth"
    torch.save({"epoch": 4, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_mAP": 71.5}, path)
    state, info = convert_reference_checkpoint(str(path))
    assert info["model_config"] == {
        "num_classes": C,
        "backbone": "resnet18",
        "feature_dim": F,
        "inter_dim": H,
        "out_dim": D,
        "embed_dim": E,
        "time_steps": 3,
    }
    assert info["nan_adjacency_rows"] == 1 and info["epoch"] == 4 and info["best_mAP"] == 71.5
    converted = build_model(state, info).eval()
    by_hand = hand_assigned_model(sd)
    assert "label_embeddings" in dict(converted.named_buffers())
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 96)
    for impl in ("reference", "fused"):
        converted.impl = by_hand.impl = impl
        with torch.no_grad():
            a, b = converted(images), by_hand(images)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    X = torch.randn(2, 9, F)
    with torch.no_grad():
        ours = converted.heads(X)
    for x, y in zip(ours, literal_heads(sd, X)):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5)


def test_resnet101_names_and_inference():
    sd = reference_state_dict(torchvision.models.resnet101)
    state, info = convert_reference_checkpoint(sd)
    assert info["model_config"]["backbone"] == "resnet101"
    assert state["backbone.trunk.layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)
    assert state["backbone.reduce.weight"].shape == (F, 2048, 1, 1)
    assert not torch.isnan(state["adj_in"]).any() and torch.equal(state["adj_out"], state["adj_in"].t())
    assert not any(k.startswith("GraphNeuralNetwork") for k in state)


def test_conversion_errors(tmp_path):
    sd = reference_state_dict()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_reference_checkpoint(str(tmp_path / "nope.pth"))
    bad = dict(sd)
    del bad["intra_fc_1.weight"]
    with pytest.raises(ValueError, match="intra_fc_1.weight"):
        convert_reference_checkpoint(bad)
    with pytest.raises(ValueError, match="posFeature"):
        convert_reference_checkpoint({**sd, "posFeature": torch.zeros(C, 3, F)})
    with pytest.raises(ValueError, match=f"intra_classifiers.weight rows is {P - 1}, expected {P}"):
        convert_reference_checkpoint({**sd, "intra_classifiers.weight": torch.zeros(P - 1, D)})


def test_cli_writes_loadable_checkpoint(tmp_path):
    sd = reference_state_dict()
    src, dst = tmp_path / "ref.pth", tmp_path / "out" / "sst.pt"
    torch.save(sd, src)
    assert cli_main(["convert-checkpoint", str(src), str(dst)]) == 0
    assert os.listdir(dst.parent) == ["sst.pt"]  # no temp file left behind
    payload = torch.load(dst, weights_only=True)
    cfg = ModelConfig(**payload["model_config"])
    model = SSTModel(cfg, payload["model"]["adj_in"], embeddings=payload["model"]["label_embeddings"])
    model.load_state_dict(payload["model"], strict=True)
    assert torch.equal(model.pairs.fc2.weight, sd["intra_fc_2.weight"])


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (str(self.marker),))


def test_cli_expected_errors_exit_2_with_one_line(tmp_path, capsys):
    sd = reference_state_dict()
    src, dst = tmp_path / "ref.pth", tmp_path / "sst.pt"
    old_umask = os.umask(0o022)
    try:
        torch.save(sd, src)
        assert cli_main(["convert-checkpoint", str(src), str(dst)]) == 0
        assert (dst.stat().st_mode & 0o777) == 0o644  # readable by the group that evaluates it
    finally:
        os.umask(old_umask)
    before = dst.read_bytes()
    capsys.readouterr()

    def fails(argv, *needles):
        assert cli_main(["convert-checkpoint", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), err

    fails([str(src), str(dst)], str(dst), "already exists")  # never overwrites
    assert dst.read_bytes() == before
    fails([str(tmp_path / "nope.pth"), str(tmp_path / "a.pt")], "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    fails([str(tmp_path / "junk.pth"), str(tmp_path / "b.pt")], "junk.pth")
    marker = tmp_path / "marker"
    torch.save({"state_dict": sd, "opt": _Payload(marker)}, tmp_path / "pickled.pth")
    fails([str(tmp_path / "pickled.pth"), str(tmp_path / "d.pt")], "pickled.pth", "--trust-checkpoint")
    assert not marker.exists() and not (tmp_path / "d.pt").exists()
    bad = dict(sd)
    del bad["fc.weight"]
    torch.save(bad, tmp_path / "partial.pth")
    fails([str(tmp_path / "partial.pth"), str(tmp_path / "e.pt")], "fc.weight")


def test_an_output_made_meanwhile_by_another_conversion_is_kept(tmp_path, capsys, monkeypatch):
    """Two conversions into one name: the check before converting passes for both; the later
    publish used to replace the earlier result (os.replace), now it exits 2 and keeps it."""
    import sst_dist.convert as conv

    src, dst = tmp_path / "ref.pth", tmp_path / "race.pt"
    torch.save(reference_state_dict(), src)
    real_build = conv.build_model

    def build_while_another_finishes(*args, **kwargs):
        dst.write_bytes(b"the other conversion's result")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(conv, "build_model", build_while_another_finishes)
    assert cli_main(["convert-checkpoint", str(src), str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dst) in err and "already exists" in err, err
    assert dst.read_bytes() == b"the other conversion's result"
    assert sorted(os.listdir(tmp_path)) == ["race.pt", "ref.pth"]  # no temporary file left
