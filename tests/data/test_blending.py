"""Phase-scheduled blending: megatron-core equivalence, prefix guarantee, carried counters."""

from __future__ import annotations

import numpy as np
import pytest
from megatron.core.datasets import helpers
from megatron.core.datasets.utils import normalize

from megatron_syne.data.blending import build_phased_blending_indices


def _megatron(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(
        index, sample_index, normalize(weights), len(weights), size, False
    )
    return index, sample_index


@pytest.mark.parametrize("weights", [[0.3, 0.7], [5, 1, 1, 3], [0.2 * 0.7, 0.2 * 0.3, 0.8]])
def test_single_phase_is_bit_identical_to_megatron_core(weights):
    size = 10_007
    index, sample_index, counters = build_phased_blending_indices(
        np.array([0, size]), np.array([weights], dtype=np.float64)
    )
    ref_index, ref_sample_index = _megatron(weights, size)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample_index)
    np.testing.assert_array_equal(counters, np.bincount(ref_index, minlength=len(weights)))


def test_prefix_guarantee_and_counters_across_changing_phases():
    rng = np.random.default_rng(0)
    num_datasets, bounds = 6, np.array([0, 500, 501, 1700, 2900, 4000, 5333])
    weights = rng.random((len(bounds) - 1, num_datasets))
    weights[1, 2] = 0.0  # a dataset switched off for a phase
    weights[3, [0, 4]] = 0.0
    index, sample_index, counters = build_phased_blending_indices(bounds, weights)
    normalized = weights / weights.sum(axis=1, keepdims=True)
    seen = np.zeros(num_datasets, dtype=np.int64)
    for p in range(len(bounds) - 1):
        phase = index[bounds[p] : bounds[p + 1]]
        counts = np.zeros((len(phase), num_datasets))
        counts[np.arange(len(phase)), phase] = 1
        prefix_counts = np.cumsum(counts, axis=0)
        positions = np.arange(1, len(phase) + 1)[:, None]
        error = prefix_counts - normalized[p] * positions
        # megatron-core's bound: never more than one sample ahead of the target in any prefix,
        # and (its greedy rule, measured) less than 1.5 samples behind.
        assert error.max() < 1.0
        assert (-error).max() < 1.5
        # Exactly megatron-core's index for this phase's weights over its active datasets.
        active = np.flatnonzero(weights[p] > 0)
        ref_index, _ = _megatron(weights[p, active].tolist(), len(phase))
        np.testing.assert_array_equal(phase, active[ref_index])
        # Counters carry: each dataset's sample ids continue where the last phase stopped.
        for d in range(num_datasets):
            ids = sample_index[bounds[p] : bounds[p + 1]][phase == d]
            np.testing.assert_array_equal(ids, seen[d] + np.arange(len(ids)))
            seen[d] += len(ids)
    np.testing.assert_array_equal(seen, counters)
    # No component sample is drawn twice.
    pairs = index.astype(np.int64) * 10**9 + sample_index
    assert len(np.unique(pairs)) == len(pairs)


def test_building_phase_by_phase_equals_building_all_at_once():
    rng = np.random.default_rng(1)
    bounds = np.array([0, 300, 700, 1000])
    weights = rng.random((3, 4))
    full_index, full_sample, full_counters = build_phased_blending_indices(bounds, weights)
    counters = None
    parts = []
    for p in range(3):
        index, sample, counters = build_phased_blending_indices(
            bounds[p : p + 2], weights[p : p + 1], counters
        )
        parts.append((index, sample))
    np.testing.assert_array_equal(np.concatenate([a for a, _ in parts]), full_index)
    np.testing.assert_array_equal(np.concatenate([b for _, b in parts]), full_sample)
    np.testing.assert_array_equal(counters, full_counters)


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="no weight"):
        build_phased_blending_indices(np.array([0, 10]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="one more entry"):
        build_phased_blending_indices(np.array([0, 10]), np.ones((2, 3)))
