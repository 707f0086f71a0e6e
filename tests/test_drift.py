"""Drift detectors on known distributions: few false alarms when nothing moves, fast alarms when it does."""

from __future__ import annotations

import numpy as np

from service.drift import MMDDrift, PageHinkley, PredictionDrift

ALPHA = 0.01
WINDOWS = 200


def test_mmd_false_positive_rate_stays_near_alpha_on_unchanged_inputs() -> None:
    rng = np.random.default_rng(0)
    detector = MMDDrift(rng.normal(size=(200, 16)), window=40, permutations=200, alpha=ALPHA, seed=1)
    results = detector.add(rng.normal(size=(40 * WINDOWS, 16)))
    assert len(results) == WINDOWS
    false_alarms = sum(r.drifted for r in results)
    # Expected about ALPHA * WINDOWS = 2; allow for the windows sharing one reference.
    assert false_alarms <= 3 * ALPHA * WINDOWS, false_alarms


def test_mmd_flags_shifted_inputs_in_the_first_window() -> None:
    rng = np.random.default_rng(0)
    detector = MMDDrift(rng.normal(size=(200, 16)), window=40, permutations=200, alpha=ALPHA, seed=1)
    shifted = rng.normal(loc=0.5, size=(40, 16))
    [result] = detector.add(shifted)
    assert result.drifted and result.p_value < ALPHA and result.statistic > 0


def test_prediction_drift_compares_the_label_mix_with_training() -> None:
    rng = np.random.default_rng(0)
    detector = PredictionDrift({"a": 100, "b": 100, "c": 100, "d": 100}, window=80, alpha=ALPHA)
    same = detector.add(list(rng.choice(["a", "b", "c", "d"], size=80 * 100)))
    assert sum(r.drifted for r in same) <= 3 * ALPHA * 100
    [moved] = detector.add(["a"] * 60 + ["b"] * 20)
    assert moved.drifted


def test_page_hinkley_fires_on_falling_accuracy_not_on_steady() -> None:
    rng = np.random.default_rng(0)
    steady = PageHinkley()
    assert not steady.add(list(rng.random(2000) < 0.9)).drifted
    falling = PageHinkley()
    falling.add(list(rng.random(300) < 0.9))
    assert falling.add(list(rng.random(100) < 0.5)).drifted
