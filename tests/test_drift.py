"""Drift detectors on known distributions: few false alarms when nothing moves, fast alarms when it does."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from service.answering import DriftSampler
from service.datasets import clinc150
from service.drift import DriftMonitor, DriftResult, MMDDrift, PageHinkley, PredictionDrift
from service.model import build_model
from service.serving_settings import DriftSettings
from service.settings import DEFAULT_BASE_MODEL, load_settings
from tests.conftest import CLINC150

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


def test_a_busy_task_has_about_its_cap_of_drift_samples_a_second_spread_over_its_traffic() -> None:
    now = [0.0]
    sampler = DriftSampler(rate=1.0, per_second=10.0, seed=0, clock=lambda: now[0])
    busy, quiet = [], []
    for step in range(20_000):  # 20 s: a busy task at 1,000 requests a second, a quiet one at 2
        now[0] = step / 1000
        busy.append(sampler("busy"))
        if step % 500 == 0:
            quiet.append(sampler("quiet"))
    assert 75 <= sum(busy[10_000:]) <= 125  # about 10 a second once its rate is known
    assert sum(busy[:10_000]) <= 160  # and a bounded overshoot while it is learnt
    assert all(quiet)  # every task has its own rate: a quiet one has every request judged
    # Spread over the traffic, not bunched at the start of each second.
    by_tenth = Counter(i % 1000 // 100 for i, kept in enumerate(busy) if kept)
    assert min(by_tenth.values()) >= 8, by_tenth
    uncapped, halved = DriftSampler(1.0, 0.0, seed=0), DriftSampler(0.5, 0.0, seed=0)
    assert all(uncapped("busy") for _ in range(1000))
    assert 420 <= sum(halved("busy") for _ in range(1000)) <= 580


def test_page_hinkley_fires_on_falling_accuracy_not_on_steady() -> None:
    rng = np.random.default_rng(0)
    steady = PageHinkley()
    assert not steady.add(list(rng.random(2000) < 0.9)).drifted
    falling = PageHinkley()
    falling.add(list(rng.random(300) < 0.9))
    assert falling.add(list(rng.random(100) < 0.5)).drifted


@pytest.mark.slow
@pytest.mark.skipif(not (CLINC150 / "data_full.json").is_file(), reason="CLINC150 is not at ../shared/data")
def test_another_domains_texts_are_flagged_on_real_minilm_embeddings() -> None:
    """Banking traffic stays quiet against a banking reference; travel traffic is flagged at once."""
    model = build_model(load_settings(base_model=DEFAULT_BASE_MODEL))
    banking, travel = clinc150(CLINC150, domains=["banking", "travel"])
    judged: list[tuple[str, DriftResult]] = []
    settings = DriftSettings(window=50, reference_size=300, permutations=200, alpha=ALPHA, queue_size=10_000)
    labels = Counter(label for _, label in banking.train)
    monitor = DriftMonitor(
        settings,
        embed=model.base_embeddings,
        reference=lambda task: (1, [t for t, _ in banking.eval[:300]], dict(labels)),
        on_result=lambda task, result: judged.append((task, result)),
        on_dropped=lambda: None,
    )
    monitor.start()
    try:
        held_out = banking.eval[300:]  # 450 held-out banking texts: 9 windows
        embeddings = model.base_embeddings([text for text, _ in held_out])
        for embedding, (_, label) in zip(embeddings, held_out, strict=True):
            monitor.observe("banking", embedding, label)
        monitor.drain()
        quiet = [r for _, r in judged if r.detector == "input"]
        assert len(quiet) == 9
        assert sum(r.drifted for r in quiet) <= 1, [r.p_value for r in quiet]
        judged.clear()
        for embedding in model.base_embeddings([text for text, _ in travel.eval[:50]]):  # one window
            monitor.observe("banking", embedding, "balance")
        monitor.drain()
        [shifted] = [r for _, r in judged if r.detector == "input"]
        assert shifted.drifted and shifted.p_value < ALPHA
    finally:
        monitor.stop()
