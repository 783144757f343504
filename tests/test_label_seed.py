"""The partial-label seed (DESIGN §4, ``label_seed``) and the training seed (``seed``) are independent.

Varying the training seed must reshuffle and re-augment without changing which labels are known;
varying the label seed must change exactly the known mask, to the literal recipe's for that seed.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_loaders import C, make_shards

from data_shards.loaders import build_loader
from data_shards.partial import partial_labels

N, P = 24, 0.5


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("labelseed")
    return out, make_shards(out, n=N)


def _partial_by_index(out, seed: int, label_seed: int, backend: str = "torch") -> tuple[np.ndarray, list]:
    loader = build_loader(out, "train", train=False, batch_size=5, image_size=16, num_workers=0,
                          proportion=P, seed=seed, label_seed=label_seed, backend=backend)
    loader.set_epoch(0)
    got = np.zeros((N, C), dtype=np.int8)
    order = []
    for b in loader:
        got[b.index.numpy()] = b.partial.numpy()
        order += b.index.tolist()
    return got, order


def test_training_seed_leaves_known_labels_alone(toy):
    out, full = toy
    a, _ = _partial_by_index(out, seed=0, label_seed=0)
    b, _ = _partial_by_index(out, seed=7, label_seed=0)
    assert np.array_equal(a, partial_labels(full, P, seed=0))
    assert np.array_equal(b, a), "the training seed changed which labels are known"
    # the training seed is really in use: the train plan differs between seeds
    order = [build_loader(out, "train", train=True, batch_size=4, image_size=16, num_workers=0,
                          proportion=P, seed=s, backend="torch").plan(0) for s in (0, 7)]
    assert not all(np.array_equal(x, y) for x, y in zip(*order))


def test_label_seed_selects_the_recipes_mask(toy):
    out, full = toy
    for label_seed in (1, 3):
        got, _ = _partial_by_index(out, seed=0, label_seed=label_seed)
        assert np.array_equal(got, partial_labels(full, P, seed=label_seed)), label_seed
    assert not np.array_equal(partial_labels(full, P, seed=1), partial_labels(full, P, seed=0))
