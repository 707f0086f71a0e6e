"""The trainer's Prometheus metrics and the drift metrics trainer and server share, with fixed label
sets (the server's own: ``service.server_metrics``).

The collector registry is passed in, never global, so each process (and each test) gets its own.
"""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from service.data_health import DataHealth
from service.drift import DriftResult

#: Latency buckets for one gRPC call, from a cached single-text forward to a slow batch.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class TrainerMetrics:
    """What the trainer exports: ingest, learning and publishing."""

    def __init__(self, registry: CollectorRegistry, strategy: str) -> None:
        self.registry = registry
        self.strategy = strategy
        process_collectors(registry)
        self.drift = DriftMetrics(registry)
        self.consumer_lag = Gauge(
            "continual_consumer_lag",
            "Records in the partition not yet read by the trainer.",
            ["partition"],
            registry=registry,
        )
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
        self.macro_accuracy = Gauge(
            "continual_task_macro_accuracy",
            "Mean of the per-label accuracies of a task's latest version on its eval records (every "
            "label counts the same, so a neglected small label shows).",
            ["task"],
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
        self.forgetting = Gauge(
            "continual_task_forgetting",
            "Best accuracy the task had in an earlier row of the accuracy matrix minus its accuracy now "
            "(Chaudhry et al. 2018); 0 for the latest task.",
            ["task"],
            registry=registry,
        )
        self.general_probe = Gauge(
            "continual_general_probe_accuracy",
            "Generative tasks: share of the general probe's questions the task's latest version answers "
            "right (the language model alone: see its first version's manifest); a fall is the model's "
            "own abilities forgotten.",
            ["task"],
            registry=registry,
        )
        self.mean_accuracy = Gauge(
            "continual_mean_accuracy",
            "ACC: mean accuracy of the learned tasks after the latest one (Lopez-Paz & Ranzato 2017).",
            registry=registry,
        )
        self.accuracy_matrix = Gauge(
            "continual_accuracy_matrix",
            "R[i][j]: accuracy on task j right after the trainer last learned task i.",
            ["after_task", "task"],
            registry=registry,
        )
        self.macro_accuracy_matrix = Gauge(
            "continual_macro_accuracy_matrix",
            "The accuracy matrix with macro accuracies (each the mean of task j's labels' accuracies).",
            ["after_task", "task"],
            registry=registry,
        )
        self.bwt = Gauge(
            "continual_bwt",
            "Backward transfer: mean change of earlier tasks' accuracy since each was last learned "
            "(Lopez-Paz & Ranzato 2017); negative means forgetting.",
            registry=registry,
        )
        self.fwt = Gauge(
            "continual_fwt",
            "Forward transfer: mean accuracy on a task measured before it was learned, minus chance "
            "(Lopez-Paz & Ranzato 2017); only when a task's eval records precede its training records.",
            registry=registry,
        )
        # Undefined until enough tasks were learned: NaN, not a misleading 0.
        self.bwt.set(float("nan"))
        self.fwt.set(float("nan"))
        self.data_sufficient = Gauge(
            "continual_task_data_sufficient",
            "1 when the task has min_task_train_records training records and every label "
            "min_label_train_records, else 0 (its versions' manifests say the same).",
            ["task"],
            registry=registry,
        )
        self.train_records = Gauge(
            "continual_task_train_records",
            "Training records the trainer has of the task.",
            ["task"],
            registry=registry,
        )
        self.eval_records = Gauge(
            "continual_task_eval_records",
            "Eval records the trainer has of the task (its eval set, repeats set aside).",
            ["task"],
            registry=registry,
        )
        self.duplicate_eval_records = Gauge(
            "continual_task_duplicate_eval_records",
            "Eval records of the task set aside because they repeat one of its training records, "
            "exactly (kind=exact) or nearly (kind=near, base-model cosine >= duplicate_cosine).",
            ["task", "kind"],
            registry=registry,
        )
        self.short_labels = Gauge(
            "continual_task_short_labels",
            "Labels of the task with fewer training records than min_label_train_records.",
            ["task"],
            registry=registry,
        )
        self.imbalance_ratio = Gauge(
            "continual_task_label_imbalance_ratio",
            "Training records of the task's largest label over those of its smallest (1: balanced).",
            ["task"],
            registry=registry,
        )
        self.live_accuracy = Gauge(
            "continual_live_accuracy",
            "Accuracy of the served version on the most recent eval records (the live window).",
            ["task"],
            registry=registry,
        )
        self.broker_errors = Counter(
            "continual_broker_errors",
            "Polls that failed because Kafka was unavailable; the trainer backs off and retries.",
            registry=registry,
        )
        self.commit_failures = Counter(
            "continual_offset_commit_failures",
            "Offset commits Kafka refused; the checkpoint still holds the offsets, the next round retries.",
            registry=registry,
        )
        self.rebalances = Counter(
            "continual_rebalances",
            "Times the consumer group took partitions from the trainer (it flushes a checkpoint first).",
            registry=registry,
        )
        self.dead_letter_failures = Counter(
            "continual_dead_letter_failures",
            "Dead letters the broker refused; each is sent again and its offset is not committed before.",
            registry=registry,
        )
        self.persist_failures = Counter(
            "continual_persist_failures",
            "Rounds that could not be made durable, by cause (registry: the disk refused a write; "
            "dead_letters: the dead-letter topic refused records). Retried with backoff; nothing is lost.",
            ["cause"],
            registry=registry,
        )
        self.persist_blocked = Gauge(
            "continual_persist_blocked",
            "1 while the trainer cannot make its latest round durable: it stops consuming and commits "
            "no offsets until a retry succeeds.",
            registry=registry,
        )
        for cause in ("registry", "dead_letters"):
            self.persist_failures.labels(cause=cause)
        self.rounds = Counter(
            "continual_rounds", "Completed train-evaluate-publish rounds.", registry=registry
        )
        self.round_seconds = Histogram(
            "continual_round_seconds",
            "Wall time of one round.",
            buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.unlabeled_records = Gauge(
            "continual_task_unlabeled_records",
            "Unlabeled texts in the task's pool (split unlabeled) as of its last trained round.",
            ["task"],
            registry=registry,
        )
        self.unlabeled_dropped = Gauge(
            "continual_task_unlabeled_dropped",
            "Unlabeled texts pushed out of the task's pool by newer ones (self_training_pool_size).",
            ["task"],
            registry=registry,
        )
        self.pseudo_labelled = Gauge(
            "continual_task_pseudo_labelled",
            "Unlabeled texts pseudo-labelled and trained on in the task's last trained round.",
            ["task"],
            registry=registry,
        )
        self.pseudo_label_accuracy = Gauge(
            "continual_task_pseudo_label_accuracy",
            "Share of pseudo-labels that a later labelled copy of the same text agreed with.",
            ["task"],
            registry=registry,
        )
        self.out_of_scope_recall = Gauge(
            "continual_out_of_scope_recall",
            "Share of the eval records of no task (label null) the out-of-scope threshold turns away.",
            registry=registry,
        )
        self.router_fit_seconds = Histogram(
            "continual_router_fit_seconds",
            "Wall time of refitting the task router on the feature memory (part of a round).",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60),
            registry=registry,
        )

    def start_task(self, task: str) -> None:
        """Create the task's series at zero, so dashboards and alerts see them before the first event."""
        for counter in (self.versions_promoted, self.versions_rejected, self.auto_rollbacks):
            counter.labels(task=task)
        self.versions_published.labels(task=task, strategy=self.strategy)
        self.training_examples.labels(task=task, strategy=self.strategy)
        self.record_self_training(task, 0, 0, 0, None)
        self.pseudo_label_accuracy.labels(task=task).set(float("nan"))  # none checked yet

    def record_data(self, task: str, health: DataHealth) -> None:
        """Export the judgement of the task's data made when its latest version was published."""
        self.data_sufficient.labels(task=task).set(1.0 if health.sufficient else 0.0)
        self.train_records.labels(task=task).set(health.train_records)
        self.eval_records.labels(task=task).set(health.eval_records)
        self.duplicate_eval_records.labels(task=task, kind="exact").set(health.exact_duplicates)
        self.duplicate_eval_records.labels(task=task, kind="near").set(health.near_duplicates)
        self.short_labels.labels(task=task).set(len(health.short_labels))
        self.imbalance_ratio.labels(task=task).set(health.imbalance_ratio)

    def record_self_training(
        self, task: str, pool: int, dropped: int, pseudo_labelled: int, accuracy: float | None
    ) -> None:
        """Export a task's unlabeled pool and what its last round pseudo-labelled."""
        self.unlabeled_records.labels(task=task).set(pool)
        self.unlabeled_dropped.labels(task=task).set(dropped)
        self.pseudo_labelled.labels(task=task).set(pseudo_labelled)
        if accuracy is not None:
            self.pseudo_label_accuracy.labels(task=task).set(accuracy)

    def record_accuracy(self, task: str, version: int, previous: int | None, accuracy: float) -> None:
        """Set the task's accuracy for its new version, dropping the superseded version's series."""
        if previous is not None:
            with contextlib.suppress(KeyError):
                self.task_accuracy.remove(task, str(previous), self.strategy)
        self.task_accuracy.labels(task=task, version=str(version), strategy=self.strategy).set(accuracy)
        self.latest_version.labels(task=task).set(version)


class DriftMetrics:
    """Drift gauges per task and detector (input, prediction, accuracy); trainer and server export them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.statistic = Gauge(
            "continual_drift_statistic",
            "Latest drift statistic: MMD² (input, training_input), chi-square (prediction), "
            "Page-Hinkley (accuracy).",
            ["task", "detector"],
            registry=registry,
        )
        self.p_value = Gauge(
            "continual_drift_p_value",
            "p-value of the latest judged window (NaN for the accuracy detector).",
            ["task", "detector"],
            registry=registry,
        )
        self.detected = Gauge(
            "continual_drift_detected",
            "1 while the latest judged window drifted, else 0.",
            ["task", "detector"],
            registry=registry,
        )
        self.windows = Counter(
            "continual_drift_windows",
            "Windows judged, by whether they drifted.",
            ["task", "detector", "drifted"],
            registry=registry,
        )
        self.dropped = Counter(
            "continual_drift_dropped",
            "Inputs not judged because the drift queue was full.",
            registry=registry,
        )

    def record(self, task: str, result: DriftResult) -> None:
        """Export one judged window."""
        labels = {"task": task, "detector": result.detector}
        self.statistic.labels(**labels).set(result.statistic)
        self.p_value.labels(**labels).set(result.p_value)
        self.detected.labels(**labels).set(1.0 if result.drifted else 0.0)
        self.windows.labels(**labels, drifted=str(result.drifted).lower()).inc()


def process_collectors(registry: CollectorRegistry) -> None:
    # Memory, CPU and open files of this process (process_*), and the Python version (python_info).
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Expose ``registry`` on http://host:port/metrics; returns the bound port (0 disables)."""
    if port == 0:
        return 0
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
