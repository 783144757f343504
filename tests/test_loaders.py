"""Loaders: same plan in every backend (ranks disjoint/complete), labels, pixels, bad input, resume."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from data_shards import format as fmt
from data_shards.loaders import build_loader
from data_shards.loaders.augment import normalize_uint8
from data_shards.loaders.common import rank_batches
from data_shards.writer import ShardWriter, dali_index_text

N, C, BATCH, SIZE = 13, 5, 3, 32
HAS_DALI = True
try:
    import nvidia.dali  # noqa: F401
except ImportError:
    HAS_DALI = False
CPU_BACKENDS = ["torch", "torch-gpu"] + (["dali"] if HAS_DALI else [])
# one grey level in normalized units is 1 / (255 * std) <= 0.0175: see test_eval_pixels_agree
LEVEL = 1.0 / (255 * 0.224)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _smooth_image(rng: np.random.Generator) -> Image.Image:
    """Gradient + blurred ellipses: smooth, asymmetric, so a wrong crop or flip shows."""
    h, w = (int(v) for v in rng.integers(40, 90, size=2))
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1).astype(np.uint8)
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        draw.ellipse([x0, y0, x0 + 20, y0 + 15], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im.filter(ImageFilter.GaussianBlur(1.5))


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def toy_jpegs(n=N, bad=(), seed=0, colour=None) -> tuple[np.ndarray, list[bytes]]:
    """(labels, JPEG bytes) of n smooth images; indices in ``bad`` get a truncated JPEG."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, C)) < 0.4, 1, -1).astype(np.int8)
    datas = []
    for i in range(n):
        data = _jpeg(Image.new("RGB", (70, 50), colour) if colour else _smooth_image(rng))
        datas.append(data[: len(data) // 2] if i in bad else data)
    return labels, datas


def make_shards(out, n=N, bad=(), seed=0, colour=None):
    """ShardWriter shards (several) of :func:`toy_jpegs`; returns the labels."""
    labels, datas = toy_jpegs(n, bad, seed, colour)
    with ShardWriter(out, "toy", "train", [f"c{k}" for k in range(C)], shard_bytes=12000) as w:
        for i, data in enumerate(datas):
            w.write(i, data, labels[i])
    return labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, make_shards(out)


def _load(out, backend, train=True, **kw):
    kw = {"batch_size": BATCH, "image_size": SIZE, "num_workers": 0, **kw}
    return build_loader(out, "train", train=train, backend=backend, **kw)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [b for b in loader]


def test_plan_by_hand():
    # eval, 2 ranks, N=5, B=2: blocks [0,1] and [2,3,4]; rank 0 padded by repeating its last sample
    assert [b.tolist() for b in rank_batches(5, 2, 0, 2, 0, 0, False, False)] == [[0, 1], [1]]
    assert [b.tolist() for b in rank_batches(5, 2, 1, 2, 0, 0, False, False)] == [[2, 3], [4]]
    # train, drop_last: 5 // 2 = 2 per rank, one batch of 2
    a = rank_batches(5, 2, 0, 2, 7, 3, True, True)
    b = rank_batches(5, 2, 1, 2, 7, 3, True, True)
    assert len(a) == len(b) == 1 and not set(a[0]) & set(b[0])
    with pytest.raises(ValueError, match="rank"):
        rank_batches(5, 2, 2, 2, 0, 0, True, True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_train_step_reads_what_one_rank_with_the_global_batch_reads(world_size):
    """World-size invariance of the data: at every step the ranks' batches, in rank order, are
    the one-rank batch of size batch * world (not each rank's own contiguous share)."""
    for epoch in (0, 1):
        one = rank_batches(35, 2 * world_size, 0, 1, 5, epoch, True, True)
        ranks = [rank_batches(35, 2, r, world_size, 5, epoch, True, True) for r in range(world_size)]
        assert all(len(r) == len(one) for r in ranks)
        for k, batch in enumerate(one):
            assert np.concatenate([r[k] for r in ranks]).tolist() == batch.tolist()


@pytest.mark.parametrize("world_size", [1, 2])
def test_backends_same_samples_disjoint_complete(shards, world_size):
    out, labels = shards
    proportion = 0.5
    known = np.random.RandomState(0).random(labels.shape) < proportion  # DESIGN §4, written here
    per = N // world_size
    seen_epochs = []
    for epoch in (0, 1):
        per_backend = {}
        for backend in CPU_BACKENDS:
            ranks = []
            for rank in range(world_size):
                loader = _load(out, backend, proportion=proportion, rank=rank, world_size=world_size,
                               num_workers=2 if backend == "torch" else 0)
                batches = _epoch(loader, epoch)
                assert len(batches) == len(loader) == per // BATCH
                for b in batches:
                    idx = b.index.numpy()
                    assert b.partial.dtype == b.full.dtype == torch.int8 and b.index.dtype == torch.int64
                    np.testing.assert_array_equal(b.full.numpy(), labels[idx])
                    np.testing.assert_array_equal(b.partial.numpy(), labels[idx] * known[idx])
                    assert b.images.shape == (len(idx), 3, SIZE, SIZE) and b.images.dtype == torch.float32
                ranks.append([b.index.tolist() for b in batches])
            flat = [i for r in ranks for b in r for i in b]
            assert len(flat) == len(set(flat)) == world_size * (per // BATCH) * BATCH  # disjoint
            assert set(flat) <= set(range(N))
            per_backend[backend] = ranks
        for backend in CPU_BACKENDS[1:]:
            assert per_backend[backend] == per_backend[CPU_BACKENDS[0]], backend
        seen_epochs.append(per_backend[CPU_BACKENDS[0]])
    assert seen_epochs[0] != seen_epochs[1]  # a new permutation each epoch


def test_eval_covers_every_sample_once_up_to_padding(shards):
    out, _ = shards
    got = [_load(out, "torch", train=False, rank=r, world_size=2) for r in range(2)]
    lens = {len(loader) for loader in got}
    idx = [i for loader in got for b in loader for i in b.index.tolist()]
    assert lens == {3} and set(idx) == set(range(N)) and len(idx) == 14  # N=13: one repeated pad


@pytest.mark.parametrize("train", [False, True])
def test_pixels_agree_across_backends(shards, train):
    """Independent bicubic implementations (PIL, DALI, torchvision) of the same plan and choices.

    Each resize is an antialiased Keys bicubic (a=-0.5) rounded to uint8, but the filters differ in
    detail (DALI's antialias kernel on strong downscales) and the JPEG decoders are different
    libjpeg-turbo builds. Measured here (40 images, sizes 32 and 448): mean 0.14-0.26 grey levels,
    max 4 levels (DALI, eval at 32, 0.01% of pixels), under 0.3% of pixels above 1.5 levels.
    Tolerance: max 5 levels, mean 0.5 level, at most 1% of pixels above 1.5 levels; a crop off by
    one pixel, a wrong flip or a channel swap moves most pixels by several levels.
    """
    out, _ = shards
    got = {be: {int(i): im for b in _epoch(_load(out, be, train=train), 2)
                for i, im in zip(b.index, b.images)} for be in CPU_BACKENDS}
    ref = got["torch"]
    for be in CPU_BACKENDS[1:]:
        assert got[be].keys() == ref.keys()
        diff = torch.stack([(got[be][i] - ref[i]).abs() for i in ref]) / LEVEL
        assert float(diff.max()) <= 5, be
        assert float(diff.mean()) <= 0.5, be
        assert float((diff > 1.5).float().mean()) <= 0.01, be


def test_normalization_of_a_flat_colour(tmp_path):
    colour = (200, 100, 30)
    make_shards(tmp_path, n=6, colour=colour)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    want = (torch.tensor(colour, dtype=torch.float64) / 255 - mean) / std
    for be in CPU_BACKENDS:
        for train in (False, True):
            for b in _load(tmp_path, be, train=train, batch_size=2):
                per_channel = b.images.double().mean(dim=(0, 2, 3))
                assert torch.allclose(per_channel, want, atol=3 * LEVEL), (be, train, per_channel, want)
    half = next(iter(_load(tmp_path, "torch", dtype=torch.bfloat16, batch_size=2)))
    assert half.images.dtype == torch.bfloat16 and half.images.shape == (2, 3, SIZE, SIZE)


def test_corrupt_jpeg_skipped_and_counted(tmp_path):
    labels = make_shards(tmp_path, bad=(4,))
    for be in CPU_BACKENDS:
        loader = _load(tmp_path, be, train=False, batch_size=4)
        batches = list(loader)
        idx = [i for b in batches for i in b.index.tolist()]
        assert loader.skipped == 1 and 4 not in idx and sorted(idx) == [i for i in range(N) if i != 4], be
        assert len(loader.skipped_where) == 1 and loader.skipped_where[0].endswith("key 000000004")
        assert len(batches) == len(loader) == 4 and [len(b.index) for b in batches] == [4, 3, 4, 1]
        for b in batches:
            np.testing.assert_array_equal(b.full.numpy(), labels[b.index.numpy()])
        list(loader)  # replaying the epoch counts it afresh, not on top
        assert loader.skipped == 1 and len(loader.skipped_where) == 1, be
        loader.set_epoch(1)
        assert loader.skipped == 0 and loader.skipped_where == []
        it = iter(loader)
        next(it)
        state = loader.state_dict()  # mid-epoch: the count so far travels with the position
        resumed = _load(tmp_path, be, train=False, batch_size=4)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == 3 and resumed.skipped == 1, be


def test_eval_tensor_is_the_loaders_eval_transform(shards):
    """predict's seam: open_rgb + eval_tensor on one image gives exactly the eval loader's pixels."""
    from data_shards.images import open_rgb
    from data_shards.loaders.augment import eval_tensor

    out, _ = shards
    loader = _load(out, "torch", train=False, batch_size=4)
    batch = next(iter(loader))
    reader = loader.reader
    for row, i in enumerate(batch.index.tolist()):
        single = eval_tensor(open_rgb(reader.read(i)), SIZE)
        assert torch.equal(single, batch.images[row])


def _rewrite_shard(tmp_path, drop_ext=None, bad_label=False):
    """Rewrite shard 0 without the first sample's ``drop_ext`` member (or with a flipped label)."""
    shard = tmp_path / fmt.shard_name("toy", "train", 0)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    first = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for m, data in members:
            if m.name == f"{first}.{drop_ext}":
                continue
            if bad_label and m.name == f"{first}.lbl":
                data = bytes((-np.frombuffer(data, np.int8)).astype(np.int8))
            tar.addfile(m, io.BytesIO(data))
    _reindex(tmp_path, shard)
    return shard.name, first


def _reindex(out, shard):
    """A new index for ``shard`` and matching hashes in _info.json: crafted, self-consistent metadata."""
    import hashlib
    import json

    text = dali_index_text(shard)
    fmt.dali_index_path(shard).write_text(text)
    info_file = fmt.info_path(out, "toy", "train")
    info = json.loads(info_file.read_text())
    for s in info["shards"]:
        if s["name"] == shard.name:
            s["bytes"], s["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
            s["index_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    info_file.write_text(json.dumps(info))


def test_missing_label_names_shard_and_key(tmp_path):
    make_shards(tmp_path)
    name, key = _rewrite_shard(tmp_path, drop_ext="lbl")
    with pytest.raises(ValueError, match=rf"{name}.*{key}.*lbl"):
        _load(tmp_path, "torch")
    with pytest.raises(ValueError, match=rf"{name}.*{key}.*lbl"):  # streaming path checks too
        list(_load(tmp_path, "torch", train=False, shard_url="{dir}/{name}"))


def test_label_differing_from_matrix_names_shard_and_key(tmp_path):
    make_shards(tmp_path)
    name, key = _rewrite_shard(tmp_path, bad_label=True)
    with pytest.raises(ValueError, match=rf"{name}, key {key}.*differs"):
        list(_load(tmp_path, "torch", train=False))


def test_class_count_mismatch(shards):
    with pytest.raises(ValueError, match="5 classes but the config says 7"):
        _load(shards[0], "torch", num_classes=7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_resume_mid_epoch(shards, backend):
    out, _ = shards
    workers = 2 if backend == "torch" else 0
    full = _epoch(_load(out, backend, num_workers=workers), 3)
    first = _load(out, backend, num_workers=workers)
    first.set_epoch(3)
    it = iter(first)
    next(it)
    state = first.state_dict()
    assert state["epoch"] == 3 and state["batch"] == 1
    resumed = _load(out, backend, num_workers=workers)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's own call after loading: keeps the position
    rest = list(resumed)
    assert len(rest) == len(full) - 1
    for a, b in zip(rest, full[1:]):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="seed"):
        _load(out, backend, seed=1).load_state_dict(state)


def test_webdataset_streaming_equals_random_access(shards):
    out, _ = shards
    ref = _epoch(_load(out, "torch"), 1)
    for url in ("{dir}/{name}", "pipe:cat {dir}/{name}"):
        got = _epoch(_load(out, "torch", shard_url=url, num_workers=2), 1)
        assert [b.index.tolist() for b in got] == [b.index.tolist() for b in ref]
        assert all(torch.equal(a.images, b.images) for a, b in zip(got, ref))


@pytest.mark.gpu
def test_gpu_decode_matches_cpu(shards):
    """The GPU transforms follow the PIL pipeline; nvJPEG itself is checked against libjpeg-turbo.

    The two decoders legitimately differ (IDCT rounding and chroma upsampling, which the JPEG
    standard leaves open): on an H100 (2026-11-27) nvJPEG's pixels differed from libjpeg-turbo's
    by 1.75 levels on average, up to 50 at the sharp colour edges of these images, and the full
    GPU loader's output by 0.46 on average. So the transform check feeds CPU-decoded pixels
    through the GPU code and holds it to test_pixels_agree's bounds, and the decoder and the full
    loader get bounds with room over what was measured.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    from data_shards.loaders.augment import AugConfig
    from data_shards.loaders.gpu_decode import transform_decoded

    out, _ = shards
    _, datas = toy_jpegs()
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    cpu_dec = decode_jpeg(encoded, mode=ImageReadMode.RGB)
    for train in (False, True):
        loader = _load(out, "torch", train=train)
        cpu = _epoch(loader, 0)
        gpu = _epoch(_load(out, "torch-gpu", train=train, device="cuda"), 0)
        assert [b.index.tolist() for b in gpu] == [b.index.tolist() for b in cpu]
        for a, b in zip(gpu, cpu):
            assert a.images.is_cuda and a.partial.is_cuda
            idx = b.index.numpy()
            same_decode = transform_decoded(
                [cpu_dec[i].cuda() for i in idx.tolist()], idx, AugConfig(SIZE), train, loader.seed, 0
            )
            diff = (normalize_uint8(same_decode).cpu() - b.images).abs() / LEVEL
            stats = (float(diff.max()), float(diff.mean()), float((diff > 1.5).float().mean()))
            assert stats[0] <= 5 and stats[1] <= 0.5 and stats[2] <= 0.01, (train, stats)
            full = (a.images.cpu() - b.images).abs() / LEVEL
            assert float(full.mean()) <= 1.0, (train, float(full.mean()))
    gpu_dec = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
    raw = torch.cat([(a.float() - b.cpu().float()).abs().flatten() for a, b in zip(cpu_dec, gpu_dec)])
    assert float(raw.mean()) <= 3.0, (float(raw.max()), float(raw.mean()))


@pytest.mark.skipif(not HAS_DALI, reason="needs nvidia-dali")
@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_webdataset_reader_follows_eval_plan(shards, world_size):
    """fn.readers.webdataset (shard_id=rank, num_shards=W, padded) reads exactly the eval plan."""
    out, _ = shards
    for rank in range(world_size):
        kw = {"train": False, "rank": rank, "world_size": world_size}
        ref = list(_load(out, "dali", **kw))
        got = list(_load(out, "dali", dali_reader="webdataset", **kw))
        assert [b.index.tolist() for b in got] == [b.index.tolist() for b in ref]
        assert all(torch.equal(a.images, b.images) and torch.equal(a.full, b.full) for a, b in zip(got, ref))
    with pytest.raises(ValueError, match="evaluation"):
        _load(out, "dali", train=True, dali_reader="webdataset")


def test_auto_backend_and_bad_backend(shards):
    assert _load(shards[0], "auto").backend == "torch"  # the measured CPU default (benchmarks/loader.py)
    with pytest.raises(ValueError, match="backend must be one of"):
        _load(shards[0], "jax")
