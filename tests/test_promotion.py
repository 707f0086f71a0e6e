"""The promotion gate and the live-accuracy window, as pure decisions."""

from __future__ import annotations

from service.promotion import LiveAccuracy, gate


def test_the_gate_passes_the_first_version_and_better_or_slightly_worse_ones() -> None:
    assert gate(0.5, None, None, tolerance=0.02).promote
    assert gate(0.90, 0.91, 3, tolerance=0.02).promote
    assert gate(0.95, 0.91, 3, tolerance=0.0).promote
    assert gate(None, 0.91, 3, tolerance=0.0).promote  # nothing to judge by


def test_the_gate_rejects_a_version_worse_by_more_than_the_tolerance_and_says_why() -> None:
    decision = gate(0.80, 0.91, 3, tolerance=0.02)
    assert not decision.promote
    assert "below served v3" in decision.reason and "0.1100" in decision.reason


def test_live_accuracy_judges_only_a_full_window_of_the_same_version() -> None:
    live = LiveAccuracy(window=4, floor=0.5)
    live.observe("t", 1, [False, False, False])
    assert live.below_floor("t") is None  # window not full yet
    live.observe("t", 1, [False])
    assert live.below_floor("t") == 0.0
    live.observe("t", 2, [True, True, True, False])  # a new version starts a new window
    assert live.below_floor("t") is None and live.accuracy("t") == 0.75
    live.observe("t", 2, [False, False])  # the window slides: the last four are 1 of 4 right
    assert live.below_floor("t") == 0.25


def test_a_floor_of_zero_turns_the_watch_off() -> None:
    live = LiveAccuracy(window=1, floor=0.0)
    live.observe("t", 1, [False])
    assert live.below_floor("t") is None
