"""Partial labels must be bit-identical to the literature's numpy recipe (DESIGN §4)."""

from __future__ import annotations

import numpy as np
import pytest

from data_shards.partial import partial_labels


def _literal_recipe(labels: np.ndarray, proportion: float, seed: int) -> np.ndarray:
    """The protocol exactly as written: global legacy seeding, then one uniform draw per entry."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        uniform = np.random.random(labels.shape)
    finally:
        np.random.set_state(saved)
    known = uniform < proportion
    return labels * known


def _reference_style(labels: np.ndarray, proportion: float, seed: int) -> np.ndarray:
    """The reference code's own masking steps (overwrite mask in place), as a second witness."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        mask = np.random.random(labels.shape)
    finally:
        np.random.set_state(saved)
    mask[mask < proportion] = 1
    mask[mask < 1] = 0
    return mask * labels


@pytest.mark.parametrize("n,c,p,seed", [(1, 1, 1.0, 0), (7, 3, 0.1, 0), (50, 20, 0.5, 0),
                                        (123, 80, 0.3, 0), (33, 200, 0.9, 0), (40, 17, 0.7, 5)])
def test_bit_identical_to_literal_recipe(n, c, p, seed):
    rng = np.random.default_rng(n * 1000 + c)
    labels = np.where(rng.random((n, c)) < 0.3, 1, -1).astype(np.int64)
    got = partial_labels(labels, p, seed=seed)
    want = _literal_recipe(labels, p, seed)
    assert got.dtype == np.int8 and got.shape == (n, c)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _reference_style(labels.astype(np.float64), p, seed).astype(np.int8))
    # known entries keep their label, unknown are 0
    assert np.all((got == 0) | (got == labels))


def test_does_not_touch_global_rng_and_is_deterministic():
    labels = np.ones((10, 4), dtype=np.int8)
    np.random.seed(123)
    before = np.random.random(3)
    np.random.seed(123)
    a = partial_labels(labels, 0.5)
    after = np.random.random(3)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(a, partial_labels(labels, 0.5))


def test_proportion_one_keeps_everything_and_fraction_matches():
    labels = -np.ones((200, 50), dtype=np.int8)
    assert (partial_labels(labels, 1.0) == labels).all()
    frac = (partial_labels(labels, 0.2) != 0).mean()
    assert abs(frac - 0.2) < 0.02


@pytest.mark.parametrize("p", [0.0, -0.1, 1.01, float("nan")])
def test_bad_proportion(p):
    with pytest.raises(ValueError, match="proportion"):
        partial_labels(np.ones((2, 2)), p)


def test_bad_labels():
    with pytest.raises(ValueError, match=r"\+1/-1.*\(0, 1\)"):
        partial_labels(np.array([[1, 0], [1, -1]]), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        partial_labels(np.ones(5), 0.5)
