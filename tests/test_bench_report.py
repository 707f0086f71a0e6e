"""The CLINC150 harness's reporting: figures of a run's matrices, ratios against Avalanche's template,
and the README blocks written from the results file (what bench/README.md shows must come from it)."""

import json
from pathlib import Path
from typing import Any

import pytest

from bench.cl_clinc150 import RESULTS, _figures, _template_ratios, heatmaps, table, update_readme
from bench.router_features import table as router_table


def _run(acc: float, wall_s: float) -> dict[str, Any]:
    return {
        "acc": acc,
        "acc_task_aware": acc + 0.02,
        "acc_global_head": acc - 0.01,
        "bwt": -0.01,
        "bwt_task_aware": 0.0,
        "bwt_global_head": -0.02,
        "wall_s": wall_s,
        "peak_rss_mb": 2048.0,
    }


def _results() -> dict[str, Any]:
    replay = {"given": _run(0.90, 100.0), "reversed": _run(0.94, 300.0)}
    template = {"given": _run(0.92, 200.0)}
    strategies = {
        "replay": {"orders": replay, "mean": _run(0.92, 200.0)},
        "avalanche-replay": {"orders": template, "mean": template["given"]},
    }
    return {"strategies": strategies, "avalanche_template_ratios": _template_ratios(strategies)}


def test_a_one_row_matrix_is_its_mean_and_has_no_backward_transfer() -> None:
    joint = _figures({"b": {"a": 0.9, "b": 0.7}})
    assert joint.acc == pytest.approx(0.8)
    assert joint.bwt is None
    sequential = _figures({"a": {"a": 1.0}, "b": {"a": 0.5, "b": 0.7}})
    assert sequential.acc == pytest.approx(0.6)
    assert sequential.bwt == pytest.approx(-0.5)


def test_template_ratios_compare_only_the_orders_both_ran() -> None:
    ratios = _results()["avalanche_template_ratios"]["replay / avalanche-replay"]
    assert ratios["orders"] == ["given"]
    assert ratios["acc_ratio"] == pytest.approx(0.90 / 0.92, abs=1e-4)
    assert ratios["wall_s_ratio"] == pytest.approx(0.5)


def test_the_readme_blocks_are_rewritten_from_the_results(tmp_path: Path) -> None:
    out = tmp_path / "results" / "cl_clinc150.json"
    out.parent.mkdir()
    for name in ("replay_given", "replay_given_global_head", "replay_reversed"):
        (out.parent / f"cl_clinc150_{name}.png").touch()
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- cl_clinc150 table -->\nstale\n<!-- /cl_clinc150 table -->\nmiddle\n"
        "<!-- cl_clinc150 heatmaps -->\n<!-- /cl_clinc150 heatmaps -->\nend\n"
    )
    results = _results()
    update_readme(results, out, readme)
    text = readme.read_text()
    assert "stale" not in text
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    assert table(results) in text
    assert "| replay | **mean** | 92.0% | 94.0% | 91.0% |" in text
    assert "| replay / avalanche-replay | given | 0.978 |" in text
    assert heatmaps(results, out) in text
    assert "![replay, given order, global head](results/cl_clinc150_replay_given_global_head.png)" in text
    assert "- `replay`: [reversed, task-agnostic](results/cl_clinc150_replay_reversed.png)" in text
    # Written twice, the README does not change: the blocks are replaced, not appended.
    update_readme(results, out, readme)
    assert readme.read_text() == text


def test_a_readme_without_the_markers_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="cl_clinc150 table"):
        update_readme(_results(), tmp_path / "cl_clinc150.json", readme)
    assert readme.read_text() == "no markers here\n"


@pytest.mark.parametrize("out", sorted(RESULTS.glob("cl_clinc150*.json")), ids=lambda path: path.stem)
def test_the_committed_readme_shows_the_committed_results(out: Path) -> None:
    # A results change lands with its README (`python -m bench.cl_clinc150 --out FILE --readme`).
    results = json.loads(out.read_text())
    readme = (out.parents[1] / "README.md").read_text()
    assert table(results) in readme
    if f"<!-- {out.stem} heatmaps -->" in readme or out.stem == "cl_clinc150":
        assert heatmaps(results, out) in readme


def test_the_router_features_table_shows_every_split_measured() -> None:
    rows = [{"layers": 1, "accuracy": 0.9603, "fit_s": 8.7}, {"layers": 4, "accuracy": 0.972, "fit_s": 25.8}]
    test = [{"layers": 1, "accuracy": 0.9556, "fit_s": 9.0}, {"layers": 4, "accuracy": 0.9636, "fit_s": 26.0}]
    lines = router_table({"val": rows, "test": test}).splitlines()
    assert lines[0] == "| last layers read | val accuracy | test accuracy | fit |"
    assert lines[2:] == ["| 1 | 96.03% | 95.56% | 9 s |", "| 4 | 97.20% | 96.36% | 26 s |"]
