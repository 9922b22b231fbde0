"""Phase-scheduled blending indices: megatron-core's greedy blend with piecewise-constant weights.

megatron-core's ``helpers.build_blending_indices`` assigns sample ``s`` to the dataset with the
largest error ``w_i * max(s, 1) - count_i``; every prefix of the index is then within one sample
of the target weights. Here the weights change at phase boundaries (stages and mixer updates):

- inside phase ``p`` (samples ``[start_p, end_p)``), the greedy rule runs on the phase-local
  position and phase-local counts, so every prefix *of the phase* keeps megatron-core's
  guarantee for that phase's weights;
- the per-dataset sample counters (``dataset_sample_index``) carry over phases, so a dataset's
  samples are consumed in order across the whole run and nothing repeats before the dataset is
  exhausted.

With one phase and all weights positive the result is bit-identical to
``helpers.build_blending_indices``. Per sample the work is one pass over the datasets that are
active in the phase, so the build time does not grow with the number of phases, and lookups at
training time are two array reads.
"""

from __future__ import annotations

import numba
import numpy as np

MAX_DATASETS = np.iinfo(np.int16).max


@numba.njit(cache=True, nogil=True)
def _build_phased(
    dataset_index, dataset_sample_index, phase_bounds, phase_weights, counters, out_offset
):
    num_phases = phase_weights.shape[0]
    num_datasets = phase_weights.shape[1]
    active = np.empty(num_datasets, dtype=np.int64)
    weights = np.empty(num_datasets, dtype=np.float64)
    local = np.empty(num_datasets, dtype=np.float64)
    for p in range(num_phases):
        num_active = 0
        for d in range(num_datasets):
            if phase_weights[p, d] > 0.0:
                active[num_active] = d
                weights[num_active] = phase_weights[p, d]
                local[num_active] = 0.0
                num_active += 1
        start = phase_bounds[p]
        for s in range(start, phase_bounds[p + 1]):
            position = max(float(s - start), 1.0)
            best = 0
            best_error = weights[0] * position - local[0]
            for a in range(1, num_active):
                error = weights[a] * position - local[a]
                if error > best_error:
                    best_error = error
                    best = a
            d = active[best]
            dataset_index[s - out_offset] = d
            dataset_sample_index[s - out_offset] = counters[d]
            counters[d] += 1
            local[best] += 1.0


def normalize_phase_weights(phase_weights: np.ndarray) -> np.ndarray:
    """Rows normalised to sum to 1 exactly as megatron-core's ``utils.normalize`` does."""
    weights = np.asarray(phase_weights, dtype=np.float64)
    if weights.ndim != 2:
        raise ValueError(f"phase weights must be [phases, datasets], got shape {weights.shape}")
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError("phase weights must be finite and >= 0")
    sums = weights.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise ValueError(f"phase(s) {np.flatnonzero(sums[:, 0] <= 0).tolist()} have no weight")
    return weights / sums


def build_phased_blending_indices(
    phase_bounds: np.ndarray,
    phase_weights: np.ndarray,
    counters: np.ndarray | None = None,
    dataset_index: np.ndarray | None = None,
    dataset_sample_index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build blending indices for consecutive phases.

    Args:
        phase_bounds: ``[P + 1]`` int64 global sample positions; phase ``p`` covers
            ``[phase_bounds[p], phase_bounds[p + 1])`` (samples, not tokens).
        phase_weights: ``[P, D]`` non-negative weights per phase (normalised here).
        counters: ``[D]`` int64 samples already drawn from each dataset before
            ``phase_bounds[0]`` (carried from earlier phases); not modified.
        dataset_index, dataset_sample_index: optional preallocated outputs of length
            ``phase_bounds[-1] - phase_bounds[0]`` (int16 / int64), e.g. memory maps.

    Returns:
        ``(dataset_index int16, dataset_sample_index int64, counters_after int64)``.
    """
    bounds = np.ascontiguousarray(phase_bounds, dtype=np.int64)
    weights = normalize_phase_weights(phase_weights)
    if bounds.ndim != 1 or len(bounds) != weights.shape[0] + 1:
        raise ValueError("phase_bounds must have one more entry than phase_weights has rows")
    if (np.diff(bounds) < 0).any():
        raise ValueError("phase_bounds must be non-decreasing")
    num_datasets = weights.shape[1]
    if num_datasets > MAX_DATASETS:
        raise ValueError(f"at most {MAX_DATASETS} datasets can be blended (int16 index)")
    size = int(bounds[-1] - bounds[0])
    if dataset_index is None:
        dataset_index = np.empty(size, dtype=np.int16)
    if dataset_sample_index is None:
        dataset_sample_index = np.empty(size, dtype=np.int64)
    if len(dataset_index) != size or len(dataset_sample_index) != size:
        raise ValueError(f"output arrays must have length {size}")
    if counters is None:
        counters_after = np.zeros(num_datasets, dtype=np.int64)
    else:
        counters_after = np.array(counters, dtype=np.int64, copy=True)
        if counters_after.shape != (num_datasets,):
            raise ValueError(f"counters must have shape ({num_datasets},)")
    _build_phased(
        dataset_index,
        dataset_sample_index,
        bounds,
        np.ascontiguousarray(weights),
        counters_after,
        int(bounds[0]),
    )
    return dataset_index, dataset_sample_index, counters_after
