"""Monitoring: alert rules pass promtool, the dashboard and rules name only exported metrics, and a real
Prometheus scraping a real trainer and server sees every one of them move."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from service.api import continual_pb2, continual_pb2_grpc
from service.datasets import TaskData, records, synthetic
from service.ingest import ensure_topics
from service.local_kafka import free_port
from service.metrics import TrainerMetrics
from service.producer import produce
from service.server_metrics import ServerMetrics
from service.settings import Settings
from tests.helpers import eventually

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "continual.json"
#: Series Prometheus makes itself.
BUILT_IN = {"up"}

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="needs promtool (make prometheus)"
)


#: Series that only a generative task makes (one per task, set when its version is measured).
GENERATIVE_TASKS_ONLY = {"continual_general_probe_accuracy"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    names = set()
    for expr in exprs:
        without_labels = re.sub(r"\{[^}]*\}", "", expr)
        names |= set(re.findall(r"\b((?:continual|process|python)_[a-z_]+|up)\b", without_labels))
    return names


def exported_names() -> set[str]:
    """Every sample name the trainer and the server can export."""
    names = set()
    for metrics in (TrainerMetrics(CollectorRegistry(), "lora-per-task"), ServerMetrics(CollectorRegistry())):
        for family in metrics.registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""]
            )
            names |= {family.name + suffix for suffix in suffixes}
    return names


@needs_promtool
def test_alert_rules_and_config_pass_promtool() -> None:
    for command in (
        ["promtool", "check", "rules", "alerts.yml"],
        ["promtool", "check", "config", "prometheus.yml"],
        ["promtool", "test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run(command, cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    used = metric_names(dashboard_exprs() + rule_exprs())
    assert len(used) >= 15, used  # the regex really finds them
    assert used - exported_names() - BUILT_IN == set()


# --- real Prometheus ---------------------------------------------------------------------------------

SHIFTED = [
    "quarterly revenue grew despite supply chain delays in asia",
    "the telescope captured a distant galaxy cluster last night",
    "add two cups of flour and stir until the batter is smooth",
    "the senate vote on the infrastructure bill was postponed",
    "our goalkeeper saved a penalty in the final minute",
]


@pytest.fixture
def prometheus(cluster: Settings, tmp_path: Path) -> Iterator[str]:
    """Real Prometheus (Debian package) scraping the cluster's trainer and server every second."""
    if shutil.which("prometheus") is None:
        pytest.skip("needs prometheus (make prometheus)")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "continual-trainer",
                "static_configs": [{"targets": [f"127.0.0.1:{cluster.trainer_metrics_port}"]}],
            },
            {
                "job_name": "continual-server",
                "static_configs": [{"targets": [f"127.0.0.1:{cluster.server_metrics_port}"]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    try:
        eventually(ready, timeout_s=60, what="Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    body = urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10)
    reply = json.loads(body.read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]  # type: ignore[no-any-return]


def value(url: str, expr: str) -> float | None:
    result = query(url, expr)
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_prometheus_sees_every_series_the_dashboard_and_alerts_use(
    cluster: Settings, prometheus: str
) -> None:
    settings = cluster
    assert settings.kafka_bootstrap is not None
    everything = synthetic(num_tasks=2, labels_per_task=4, train_per_label=40, eval_per_label=20)
    tasks = [TaskData(name=t.name, train=t.train, eval=t.eval[:40]) for t in everything]
    later_eval = [TaskData(name=t.name, train=[], eval=t.eval[40:]) for t in everything]
    ensure_topics(settings)
    produce(settings.kafka_bootstrap, settings.kafka_topic, records(tasks))
    bad = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    bad.send(settings.kafka_topic, key=b"synthetic-0", value=b"not json")
    bad.flush()

    with grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
        stub = continual_pb2_grpc.ContinualStub(channel)

        def served() -> bool:
            try:
                listed = stub.ListAdapters(continual_pb2.ListAdaptersRequest()).adapters
            except grpc.RpcError:
                return False
            learned = {a.task for a in listed if (a.train_records, a.eval_records) == (160, 40)}
            return learned == {t.name for t in tasks}

        eventually(served, timeout_s=300, interval_s=1, what="both tasks learned and served")
        # Eval records that arrive after serving started: the live watch judges the served version.
        produce(settings.kafka_bootstrap, settings.kafka_topic, records(later_eval))

        # In-distribution traffic on both tasks, then another topic's texts sent as synthetic-0's, each
        # for as long as it takes: drift samples at most drift_max_samples_per_s of a task's requests.
        input_drift = 'continual_drift_detected{task="synthetic-0",detector="input"}'
        size = min(len(task.eval) for task in tasks)
        in_distribution = itertools.cycle([(t.name, t.eval[i][0]) for i in range(size) for t in tasks])
        shifted = itertools.cycle([("synthetic-0", text) for text in SHIFTED])
        answered = 0

        def judged(traffic: Iterator[tuple[str, str]]) -> tuple[float] | None:
            """Twenty more requests, then synthetic-0's input drift as Prometheus has it (None: no
            window judged yet)."""
            nonlocal answered
            for task, text in itertools.islice(traffic, 20):
                stub.Predict(continual_pb2.PredictRequest(task=task, text=text))
                answered += 1
            observed = value(prometheus, input_drift)
            return None if observed is None else (observed,)

        (quiet,) = eventually(lambda: judged(in_distribution), timeout_s=120, what="a first judged window")
        eventually(lambda: judged(shifted) == (1.0,), timeout_s=120, what="input drift on synthetic-0")
        with pytest.raises(grpc.RpcError):
            stub.Predict(continual_pb2.PredictRequest(task="synthetic-0", text=""))

    # Drift rose when shifted traffic was sent, and was not up before it.
    assert quiet == 0.0
    assert value(prometheus, 'continual_drift_detected{task="synthetic-1",detector="input"}') == 0.0

    # Every series the dashboard and the alert rules use exists (but those only a generative task makes:
    # this cluster learns classifiers; tests/test_generative_stream.py reads them from the trainer).
    def missing() -> set[str]:
        used = metric_names(dashboard_exprs() + rule_exprs()) - GENERATIVE_TASKS_ONLY
        return {name for name in used if not query(prometheus, f'count({{__name__="{name}"}})')}

    eventually(lambda: not missing(), timeout_s=60, what=f"series to appear (missing: {missing()})")

    # And they move as expected.
    accuracy = {
        r["metric"]["task"]: float(r["value"][1]) for r in query(prometheus, "continual_task_accuracy")
    }
    assert set(accuracy) == {"synthetic-0", "synthetic-1"} and min(accuracy.values()) >= 0.6, accuracy
    for expr, expected in (
        ('sum(continual_records_consumed_total{split="train"})', 320),
        ('continual_records_dead_lettered_total{reason="not_json"}', 1),
        ('sum(continual_requests_total{method="Predict",code="OK"})', answered),
        ('continual_requests_total{method="Predict",code="INVALID_ARGUMENT"}', 1),
        ('up{job="continual-server"}', 1),
    ):
        # Counters reach their totals at the next scrape.
        eventually(
            lambda e=expr, x=expected: value(prometheus, e) == x, timeout_s=30, what=f"{expr} == {expected}"
        )
    assert value(prometheus, "min(continual_live_accuracy)") >= 0.5  # type: ignore[operator]
