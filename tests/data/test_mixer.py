"""The SynE update rule on the paper's example, its clipping and floor, and the mixer state."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_syne.data.mixer import TopicMixer, project_box_simplex, syne_update
from megatron_syne.data.spec import MixerSpec

PREVIOUS = np.array([1.26, 1.82, 1.54])  # Figure 1 of the paper
CURRENT = np.array([1.32, 1.45, 1.60])


def test_paper_example_worse_topics_gain_weight():
    weights = np.full(3, 1 / 3)
    new, delta, factor = syne_update(weights, PREVIOUS, CURRENT, alpha=1.0)
    np.testing.assert_allclose(delta, (CURRENT - PREVIOUS) / PREVIOUS)
    np.testing.assert_allclose(factor, 1 + delta)
    expected = weights * factor / np.sum(weights * factor)
    np.testing.assert_allclose(new, expected)  # no clipping by default
    assert new[0] > weights[0] and new[2] > weights[2] and new[1] < weights[1]
    assert new.sum() == pytest.approx(1.0)
    # The worse-getting topic with the larger relative increase gains more.
    assert new[0] > new[2]


def test_max_change_clips_and_still_sums_to_one():
    weights = np.full(3, 1 / 3)
    new, _, _ = syne_update(weights, PREVIOUS, CURRENT, alpha=5.0, max_change=0.02)
    assert np.abs(new - weights).max() <= 0.02 + 1e-9
    assert new.sum() == pytest.approx(1.0, abs=1e-12)
    assert new[1] == pytest.approx(weights[1] - 0.02)  # the big improver hits the clip
    assert new[0] > weights[0] and new[2] > weights[2]


def test_floor_holds_for_a_strongly_improving_topic():
    weights = np.array([0.05, 0.5, 0.45])
    previous, current = np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.2, 2.2])
    unclipped, _, _ = syne_update(weights, previous, current, alpha=1.0)
    assert unclipped[0] < 0.03
    new, _, _ = syne_update(weights, previous, current, alpha=1.0, floor=0.04)
    assert new[0] == pytest.approx(0.04)
    assert new.sum() == pytest.approx(1.0)


def test_importance_and_absolute_normalization():
    weights = np.full(2, 0.5)
    prev, cur = np.array([1.0, 1.0]), np.array([1.1, 1.1])
    new, delta, _ = syne_update(
        weights, prev, cur, importance=np.array([1.0, 0.0]), normalization="absolute"
    )
    np.testing.assert_allclose(delta, [0.1, 0.1])
    assert new[0] > 0.5 > new[1]


def test_projection_is_the_closest_feasible_point():
    rng = np.random.default_rng(0)
    target = rng.random(5)
    target /= target.sum()
    lower, upper = np.full(5, 0.1), np.full(5, 0.3)
    x = project_box_simplex(target, lower, upper)
    assert (
        x.sum() == pytest.approx(1.0) and (x >= lower - 1e-12).all() and (x <= upper + 1e-12).all()
    )
    for _ in range(200):  # no random feasible point is closer
        y = np.clip(x + rng.normal(0, 0.02, 5), lower, upper)
        y = y - (y.sum() - 1) / 5
        if (y >= lower).all() and (y <= upper).all():
            assert np.linalg.norm(y - target) >= np.linalg.norm(x - target) - 1e-9


def test_mixer_history_and_state_round_trip():
    spec = MixerSpec(interval_tokens=100, alpha=1.0, max_change=0.5, floor=0.0)
    groups = {"web": ["web/a", "web/b", "web/c"]}
    mixer = TopicMixer(spec, groups, {"web/a": 0.2, "web/b": 0.5, "web/c": 0.3})
    first = mixer.observe(dict(zip(groups["web"], PREVIOUS)), 0, 0, 0, "s1")
    assert not first["updated"] and mixer.weights["web/a"] == 0.2
    second = mixer.observe(dict(zip(groups["web"], CURRENT)), 10, 40, 640, "s1")
    assert second["updated"]
    assert mixer.weights["web/a"] > 0.2 and mixer.weights["web/b"] < 0.5
    restored = TopicMixer(spec, groups, {"web/a": 0.2, "web/b": 0.5, "web/c": 0.3})
    restored.load_state_dict(mixer.state_dict())
    assert restored.weights == mixer.weights and restored.history == mixer.history
    with pytest.raises(ValueError, match="no validation loss"):
        mixer.observe({"web/a": 1.0}, 20, 80, 1280, "s1")
