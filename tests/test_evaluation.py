"""ACC, BWT, forgetting and FWT on matrices, and per-label and macro accuracy, worked out by hand."""

from __future__ import annotations

import pytest

from service.evaluation import label_accuracy, macro_accuracy, summarize


def test_figures_of_a_three_task_matrix() -> None:
    matrix = {
        "a": {"a": 0.9},
        "b": {"a": 0.7, "b": 0.8, "c": 0.40},
        "c": {"a": 0.6, "b": 0.8, "c": 0.95},
    }
    chance = {"a": 0.25, "b": 0.25, "c": 0.25}
    summary = summarize(matrix, before_learning={"c": 0.40}, untrained=chance)
    assert summary.acc == pytest.approx((0.6 + 0.8 + 0.95) / 3)
    assert summary.bwt == pytest.approx(((0.6 - 0.9) + (0.8 - 0.8)) / 2)
    assert summary.forgetting == pytest.approx({"a": 0.3, "b": 0.0, "c": 0.0})
    assert summary.mean_forgetting == pytest.approx(0.15)
    # Only c was measured in the row before it was learned: FWT = 0.40 - 0.25.
    assert summary.fwt == pytest.approx(0.15)


def test_improving_tasks_have_negative_forgetting_and_positive_bwt() -> None:
    summary = summarize({"a": {"a": 0.5}, "b": {"a": 0.7, "b": 0.9}})
    assert summary.bwt == pytest.approx(0.2)
    assert summary.forgetting["a"] == pytest.approx(-0.2)
    assert summary.fwt is None  # nothing measured before it was learned


def test_forgetting_starts_from_the_row_a_task_was_learned_in() -> None:
    # b measured untrained in a's row (0.6, for FWT) scored above what learning it gave (0.5): that is
    # not something b knew and forgot, so only rows from b's own on count.
    matrix = {
        "a": {"a": 0.9, "b": 0.6},
        "b": {"a": 0.8, "b": 0.5},
        "c": {"a": 0.8, "b": 0.4, "c": 0.9},
    }
    summary = summarize(matrix)
    assert summary.forgetting == pytest.approx({"a": 0.1, "b": 0.1, "c": 0.0})
    assert summary.mean_forgetting == pytest.approx(0.1)


def test_an_empty_matrix_has_no_figures() -> None:
    summary = summarize({})
    assert (summary.acc, summary.bwt, summary.fwt, summary.mean_forgetting) == (None, None, None, None)


def test_macro_accuracy_counts_every_label_the_same() -> None:
    rows = [("t1", "big"), ("t2", "big"), ("t3", "big"), ("t4", "small"), ("t5", "big")]
    per_label = label_accuracy(rows, [True, True, True, False, False])
    assert per_label == {"big": 0.75, "small": 0.0}
    assert macro_accuracy(per_label) == pytest.approx(0.375)  # micro: 3 of 5 = 0.6
    assert label_accuracy([], []) == {} and macro_accuracy({}) is None
