"""The rerank's integer GEMM (index/integer_scoring.py) against float64 arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from index.integer_scoring import BITS, integer_scorer, split_weights


def test_split_weights_reconstructs_each_weight_to_half_a_low_step(rng):
    weights = rng.normal(size=(64, 5)) * np.array([1e-3, 1.0, 30.0, 1.0, 0.0])  # scales apart, one zero
    parts, steps = split_weights(weights)
    assert parts.dtype == np.int8 and np.abs(parts).max() <= BITS
    m = weights.shape[1]
    scaled = parts.astype(np.float64) * steps.astype(np.float64)
    rebuilt = scaled[:, :m] + scaled[:, m:]
    low_step = steps[m:]
    assert np.all(np.abs(rebuilt - weights) <= low_step / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(rebuilt[:, 4] == 0)


@pytest.mark.parametrize("width", [16, 128, 256])
def test_integer_products_match_float64(rng, width):
    codes = rng.integers(0, 256, size=(3000, width), dtype=np.uint8)
    weights = rng.normal(size=(width, 7)).astype(np.float32)
    offset = rng.normal(size=7).astype(np.float32)
    exact = codes.astype(np.float64) @ weights.astype(np.float64) + offset
    got = integer_scorer()(codes, weights, offset)
    assert got.shape == (3000, 7) and got.dtype == np.float32
    assert np.abs(got - exact).max() <= 2e-4 * np.abs(exact).max()


def test_more_threads_give_the_same_products(rng):
    """A lone search splits the rows over the idle cores; the integer sums, and so the results, are
    the same as on one core."""
    codes = rng.integers(0, 256, size=(25_600, 256), dtype=np.uint8)
    weights = rng.normal(size=(256, 8)).astype(np.float32)
    offset = rng.normal(size=8).astype(np.float32)
    one, two = integer_scorer(1), integer_scorer(2)
    assert (one.threads, two.threads) == (1, 2)
    np.testing.assert_array_equal(two(codes, weights, offset), one(codes, weights, offset))


def test_largest_codes_times_largest_weights_do_not_saturate():
    """All-255 codes against weights at their largest positive value: with 8-bit weights (127), the
    int16 pair sums of MLAS's AVX2 kernel overflow (255 * 127 * 2 > 32,767) on CPUs without VNNI."""
    codes = np.full((64, 256), 255, dtype=np.uint8)
    weights = np.ones((256, 3), dtype=np.float32) * np.array([1.0, -1.0, 0.5], dtype=np.float32)
    got = integer_scorer()(codes, weights, np.zeros(3, np.float32))
    np.testing.assert_allclose(got, np.tile([255 * 256, -255 * 256, 255 * 128], (64, 1)), rtol=1e-6)


def test_empty_codes_give_empty_products():
    got = integer_scorer()(np.zeros((0, 32), np.uint8), np.ones((32, 2), np.float32), np.zeros(2, np.float32))
    assert got.shape == (0, 2)
