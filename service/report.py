"""A version's report for a person: what it gets right and wrong, on what data, and what changed from
the version that was served when it was published.

Accuracy alone is a poor exam. Each published version gets ``report.md`` and a figure beside its
weights in the registry (``Registry.publish``), rendered from its manifest: per-label accuracy, the
most confused label pairs and a sample of wrong answers with their texts (``mistakes``, measured by
the trainer on the eval records), data sufficiency and imbalance (``service.data_health``), eval
records set aside as repeats of training ones (``service.duplicates``), and the change from the
served version label by label. ``continual report TASK`` prints or writes it.
"""

from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from service.data_health import DataHealth

REPORT_FILE = "report.md"
LABEL_FIGURE = "label_accuracy.png"
#: How many confused label pairs and wrong answers a version's manifest keeps.
TOP_CONFUSIONS = 10
WRONG_SAMPLE = 20
#: The figure shows at most this many labels (the least accurate ones).
FIGURE_LABELS = 60


def mistakes(records: Sequence[tuple[str, str]], predicted: Sequence[str]) -> dict[str, Any]:
    """What a version gets wrong on ``records`` (text, label) given its answers ``predicted``: the
    most confused (label, answered as) pairs and an even sample of the wrong answers, as kept in its
    manifest (``"mistakes"``)."""
    answered = zip(records, predicted, strict=True)
    wrong = [[text, label, answer] for (text, label), answer in answered if answer != label]
    pairs = Counter((label, answer) for _, label, answer in wrong)
    # Spread over the eval set (records arrive in stream order), not its first wrong answers.
    step = max(1, math.ceil(len(wrong) / WRONG_SAMPLE))
    return {
        "confusions": [[label, answer, n] for (label, answer), n in pairs.most_common(TOP_CONFUSIONS)],
        "wrong": wrong[::step][:WRONG_SAMPLE],
        "wrong_total": len(wrong),
    }


def render(manifest: Mapping[str, Any], served: Mapping[str, Any] | None) -> tuple[str, dict[str, bytes]]:
    """The report of the version ``manifest`` describes, compared with the ``served`` version's
    manifest (None: nothing was served); returns the Markdown and its figures (file name → PNG)."""
    task, version = manifest["task"], manifest["version"]
    metrics = manifest["metrics"]
    served_metrics = served["metrics"] if served is not None else {}
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest.get("created_at", 0)))
    lines = [
        f"# `{task}` v{version}",
        "",
        f"Published {created} by strategy `{manifest['strategy']}` (round {manifest.get('round', '?')}, "
        f"base model `{manifest['base_model']}`), from {metrics.get('train_records', 0)} training and "
        f"{metrics.get('eval_records', 0)} eval records.",
        "",
        "## Accuracy",
        "",
    ]
    if served is None:
        lines += ["No version was served when this one was published.", ""]
        lines += ["| | this version |", "|---|---|"]
        for name, key in (("accuracy (micro)", "accuracy"), ("macro accuracy", "macro_accuracy")):
            lines.append(f"| {name} | {_percent(metrics.get(key))} |")
    else:
        lines += [f"| | this version | served v{served['version']} | change |", "|---|---|---|---|"]
        for name, key in (("accuracy (micro)", "accuracy"), ("macro accuracy", "macro_accuracy")):
            now, before = metrics.get(key), served_metrics.get(key)
            lines.append(f"| {name} | {_percent(now)} | {_percent(before)} | {_points(now, before)} |")
    lines.append("")
    lines += _data_section(manifest)
    lines += _duplicates_section(manifest)
    lines += _label_section(manifest, served)
    lines += _mistakes_section(manifest.get("mistakes"))
    figures = {}
    if metrics.get("label_accuracy"):
        figures[LABEL_FIGURE] = _label_figure(task, version, metrics["label_accuracy"], served_metrics)
    return "\n".join(lines).rstrip() + "\n", figures


def _data_section(manifest: Mapping[str, Any]) -> list[str]:
    health = DataHealth.from_manifest(manifest)
    if health is None:
        return []
    verdict = "enough" if health.sufficient else f"**not enough**: {'; '.join(health.shortfalls())}"
    sizes = (
        "every label has as many training records"
        if health.imbalance_ratio == 1
        else f"the largest label has {health.imbalance_ratio:g} times the training records of the smallest"
    )
    return [
        "## Data",
        "",
        f"- Training data: {verdict} (minimums: {health.min_task_train_records} records per task, "
        f"{health.min_label_train_records} per label).",
        f"- Label sizes: {sizes}.",
        "",
    ]


def _duplicates_section(manifest: Mapping[str, Any]) -> list[str]:
    health = DataHealth.from_manifest(manifest)
    if health is None or not health.exact_duplicates + health.near_duplicates:
        return []
    shown = manifest.get("duplicates", [])
    lines = [
        "## Eval records that repeat training records",
        "",
        f"{health.exact_duplicates} exactly and {health.near_duplicates} nearly: set aside from the eval "
        "set, so the accuracy above is on texts the version was not trained on"
        + (f" (the first {len(shown)}; all in `duplicates.jsonl`)." if shown else "."),
        "",
    ]
    if shown:
        lines += ["| text | label | repeat |", "|---|---|---|"]
        lines += [f"| {_cell(text)} | {_cell(label)} | {kind} |" for text, label, kind in shown]
        lines.append("")
    return lines


def _label_section(manifest: Mapping[str, Any], served: Mapping[str, Any] | None) -> list[str]:
    accuracy: Mapping[str, float] = manifest["metrics"].get("label_accuracy") or {}
    if not accuracy:
        return ["No eval records yet: accuracy per label is measured once they arrive.", ""]
    before: Mapping[str, float] = {}
    if served is not None:
        before = served["metrics"].get("label_accuracy") or {}
    counts: Mapping[str, int] = manifest.get("label_counts", {})
    lines = ["## Per label", ""]
    if served is not None:
        better = sorted(label for label, a in accuracy.items() if label in before and a > before[label])
        worse = sorted(label for label, a in accuracy.items() if label in before and a < before[label])
        new = sorted(label for label in accuracy if label not in before)
        lines += [
            f"Against served v{served['version']}: {len(better)} label(s) better, {len(worse)} worse"
            + (f", {len(new)} new" if new else "")
            + "."
            + (f" Worse: {', '.join(f'`{label}`' for label in worse)}." if worse else ""),
            "",
        ]
    lines += [f"![accuracy per label]({LABEL_FIGURE})", ""]
    header = "| label | training records | accuracy |" + (" served | change |" if served is not None else "")
    lines += [header, "|---|---|---|" + ("---|---|" if served is not None else "")]
    for label in sorted(accuracy, key=lambda label: (accuracy[label], label)):
        row = f"| {_cell(label)} | {counts.get(label, 0)} | {_percent(accuracy[label])} |"
        if served is not None:
            row += f" {_percent(before.get(label))} | {_points(accuracy[label], before.get(label))} |"
        lines.append(row)
    return [*lines, ""]


def _mistakes_section(found: Mapping[str, Any] | None) -> list[str]:
    if not found or not found.get("wrong_total"):
        return [] if found is None else ["## Mistakes", "", "None on the eval records.", ""]
    lines = ["## Most confused labels", "", "| label | answered as | times |", "|---|---|---|"]
    lines += [f"| {_cell(label)} | {_cell(answer)} | {n} |" for label, answer, n in found["confusions"]]
    wrong = found["wrong"]
    lines += ["", f"## Wrong answers ({len(wrong)} of {found['wrong_total']})", ""]
    lines += ["| text | label | answered |", "|---|---|---|"]
    lines += [f"| {_cell(text)} | {_cell(label)} | {_cell(answer)} |" for text, label, answer in wrong]
    return [*lines, ""]


def _label_figure(task: str, version: int, accuracy: Mapping[str, float], served: Mapping[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(accuracy, key=lambda label: (accuracy[label], label))[:FIGURE_LABELS][::-1]
    before = served.get("label_accuracy") or {}
    figure, axes = plt.subplots(figsize=(7, 1.2 + 0.22 * len(labels)))
    axes.barh(labels, [accuracy[label] for label in labels], color="#4c72b0", label=f"v{version}")
    marked = [label for label in labels if label in before]
    if marked:
        axes.scatter([before[label] for label in marked], marked, color="#dd8452", zorder=3, label="served")
    axes.set_xlim(0, 1)
    axes.set_xlabel("accuracy on eval records")
    shown = "" if len(labels) == len(accuracy) else f" (the {len(labels)} least accurate labels)"
    axes.set_title(f"{task} v{version}: accuracy per label{shown}", fontsize=10, loc="left")
    axes.tick_params(axis="y", labelsize=7)
    axes.legend(loc="lower right", bbox_to_anchor=(1.0, 1.04), ncol=2, fontsize=7, frameon=False)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1%}"


def _points(now: float | None, before: float | None) -> str:
    if now is None or before is None or math.isnan(now) or math.isnan(before):
        return "–"
    return f"{100 * (now - before):+.1f} pts"


def _cell(text: str) -> str:
    """Text as one Markdown table cell: pipes escaped, line breaks and long runs of text shortened."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= 120 else flat[:119] + "…"
