"""Every Prometheus metric continual exports, with fixed label sets.

The collector registry is passed in, never global, so each process (and each test) gets its own.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

#: Latency buckets for one gRPC call, from a cached single-text forward to a slow batch.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class TrainerMetrics:
    """What the trainer exports: ingest, learning and publishing."""

    def __init__(self, registry: CollectorRegistry, strategy: str) -> None:
        self.registry = registry
        self.strategy = strategy
        self.records_consumed = Counter(
            "continual_records_consumed",
            "Valid records read from the training topic.",
            ["task", "split"],
            registry=registry,
        )
        self.records_dead_lettered = Counter(
            "continual_records_dead_lettered",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.training_examples = Counter(
            "continual_training_examples",
            "Examples passed through a training step (epochs count each pass).",
            ["task", "strategy"],
            registry=registry,
        )
        self.training_loss = Gauge(
            "continual_training_loss",
            "Mean training loss of the task's last round.",
            ["task", "strategy"],
            registry=registry,
        )
        self.task_accuracy = Gauge(
            "continual_task_accuracy",
            "Accuracy of a task's latest version on the task's eval records.",
            ["task", "version", "strategy"],
            registry=registry,
        )
        self.latest_version = Gauge(
            "continual_latest_version",
            "Highest version the trainer has published for the task.",
            ["task"],
            registry=registry,
        )
        self.versions_published = Counter(
            "continual_versions_published",
            "Adapter versions written to the registry.",
            ["task", "strategy"],
            registry=registry,
        )
        self.versions_promoted = Counter(
            "continual_versions_promoted",
            "New versions the gate let through to serving.",
            ["task"],
            registry=registry,
        )
        self.versions_rejected = Counter(
            "continual_versions_rejected",
            "New versions the gate kept as candidates (worse than the served one, or the task pinned).",
            ["task"],
            registry=registry,
        )
        self.auto_rollbacks = Counter(
            "continual_auto_rollbacks",
            "Rollbacks the trainer made because the served version's live accuracy fell below the floor.",
            ["task"],
            registry=registry,
        )
        self.live_accuracy = Gauge(
            "continual_live_accuracy",
            "Accuracy of the served version on the most recent eval records (the live window).",
            ["task"],
            registry=registry,
        )
        self.rounds = Counter(
            "continual_rounds", "Completed train-evaluate-publish rounds.", registry=registry
        )
        self.round_seconds = Histogram(
            "continual_round_seconds",
            "Wall time of one round.",
            buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )

    def record_accuracy(self, task: str, version: int, previous: int | None, accuracy: float) -> None:
        """Set the task's accuracy for its new version, dropping the superseded version's series."""
        if previous is not None:
            with contextlib.suppress(KeyError):
                self.task_accuracy.remove(task, str(previous), self.strategy)
        self.task_accuracy.labels(task=task, version=str(version), strategy=self.strategy).set(accuracy)
        self.latest_version.labels(task=task).set(version)


class ServerMetrics:
    """What a server exports: requests, latency and what it serves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "continual_requests",
            "gRPC calls by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "continual_request_latency_seconds",
            "gRPC call latency by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.served_version = Gauge(
            "continual_served_version",
            "Adapter version this server answers with, per task.",
            ["task"],
            registry=registry,
        )
        self.version_swaps = Counter(
            "continual_version_swaps",
            "Times this server switched a task to another version.",
            ["task"],
            registry=registry,
        )
        self.load_failures = Counter(
            "continual_version_load_failures",
            "Versions this server could not load (it keeps serving what it had).",
            ["task"],
            registry=registry,
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Expose ``registry`` on http://host:port/metrics; returns the bound port (0 disables)."""
    if port == 0:
        return 0
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
