"""The server's Prometheus metrics (requests, latency, what it serves, the inference engine). The
collector registry is passed in, never global."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.metrics import LATENCY_BUCKETS, DriftMetrics, process_collectors

#: Why a Generate request ended (``continual_generations_total{reason}``): the engine's reasons.
GENERATION_END_REASONS = ("stop", "length", "deadline", "cancelled", "error", "queue_full")


class ServerMetrics:
    """What a server exports: requests, latency and what it serves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        process_collectors(registry)
        self.drift = DriftMetrics(registry)
        self.adapters_loaded = Gauge(
            "continual_adapters_loaded",
            "Adapter versions in this server's memory (a cache of max_loaded_adapters, LRU out).",
            registry=registry,
        )
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
        self.adapter_loads = Counter(
            "continual_adapter_loads",
            "Adapter versions loaded into the model (new versions, and ones evicted then asked for again).",
            registry=registry,
        )
        self.batch_rows = Histogram(
            "continual_inference_batch_rows",
            "Rows (texts) per batch the inference engine ran.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "continual_inference_batch_seconds",
            "Time the inference engine spent on one batch (forwards and heads).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_rejections = Counter(
            "continual_inference_queue_rejections",
            "Requests refused with RESOURCE_EXHAUSTED because the inference queue was full.",
            registry=registry,
        )
        self.task_less_answers = Counter(
            "continual_task_less_answers",
            "Answers to requests naming no task, by whether the text was judged to belong to none of "
            "the served tasks (out_of_scope).",
            ["out_of_scope"],
            registry=registry,
        )
        for judged in ("true", "false"):  # both series from the start, for the share's denominator
            self.task_less_answers.labels(out_of_scope=judged)
        self.router_alone_answers = Counter(
            "continual_router_alone_answers",
            "Answers to requests naming no task that the router gave alone, without an adapter forward "
            "(router_alone_above).",
            registry=registry,
        )
        self.deadline_drops = Counter(
            "continual_inference_deadline_drops",
            "Requests dropped before their forward because the client's deadline had passed.",
            registry=registry,
        )
        self.generation_first_token = Histogram(
            "continual_generation_first_token_seconds",
            "Generative tasks: time from a Generate request's arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "continual_generated_tokens",
            "Generative tasks: tokens generated (its rate is the server's tokens per second).",
            registry=registry,
        )
        self.generations = Counter(
            "continual_generations",
            "Generative tasks: requests ended, by why (stop, length, deadline, cancelled, error, "
            "queue_full).",
            ["reason"],
            registry=registry,
        )
        for reason in GENERATION_END_REASONS:  # every series from the start, so rates start at zero
            self.generations.labels(reason=reason)
