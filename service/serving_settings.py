"""The serving side's settings: the registry it reads, the gRPC server, its inference engine, drift
judging and the metrics endpoints. ``service.settings.Settings`` inherits them, so they are still one
settings object, read once (``CONTINUAL_*``, YAML, overrides); they live here so that neither class
outgrows one job.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings


class SettingsError(ValueError):
    """Settings that cannot be used; the message names every offending field."""


@dataclass(frozen=True)
class DriftSettings:
    """How drift is judged (from the service settings)."""

    window: int
    reference_size: int
    permutations: int
    alpha: float
    queue_size: int


class ServingSettings(BaseSettings):
    """The knobs of a server: how it answers, judges drift and exports metrics."""

    # The registry, which trainer and servers share (service.registry, service.object_store)
    registry_dir: Path = Path(".continual/registry")
    registry_url: str | None = Field(
        default=None,
        description=(
            "s3://bucket/prefix: the registry in an S3-compatible bucket instead of registry_dir "
            "(servers on other machines read it there)."
        ),
    )
    registry_s3_endpoint: str | None = Field(
        default=None, description="The S3 API's URL for a store other than Amazon S3 (MinIO, R2, ...)."
    )
    registry_s3_region: str = "us-east-1"
    registry_s3_credentials_file: Path | None = Field(
        default=None,
        description="An AWS shared credentials file; unset: boto3's usual chain (AWS_* variables, role).",
    )
    registry_s3_profile: str | None = Field(default=None, description="The profile to read from it.")

    # Serving
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    grpc_workers: int = Field(
        default=64, ge=1, description="Threads taking gRPC calls (they wait on the inference queue)."
    )
    inference_workers: int = Field(
        default=0, ge=0, description="Batches a server runs at once (0: one per core, up to 8)."
    )
    max_batch_size: int = Field(
        default=32, ge=1, description="Texts the inference engine runs in one forward."
    )
    max_batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description="How long a batch that is filling waits for more requests (a lone one never waits).",
    )
    max_loaded_adapters: int = Field(
        default=512, ge=1, description="Adapter versions a server keeps in memory (least recently used out)."
    )
    max_batch_items: int = Field(default=256, ge=1, description="Items one PredictBatch call may hold.")
    stream_window: int = Field(
        default=64, ge=1, description="Requests of one PredictStream answered at once (the rest wait)."
    )
    inference_queue_size: int = Field(
        default=1024, ge=1, description="Requests waiting for the engine; more are refused."
    )
    registry_poll_s: float = Field(default=0.5, gt=0, description="How often servers look for new versions.")
    admin_token: SecretStr | None = Field(
        default=None, description="When set, ListVersions, GetAdapter, Promote and Rollback require it."
    )
    allow_unauthenticated_admin: bool = Field(
        default=False,
        description="Serve admin calls without admin_token on a grpc_host beyond loopback "
        "(a server refuses to start so otherwise).",
    )
    tls_cert_file: Path | None = Field(default=None, description="Server certificate (PEM); enables TLS.")
    tls_key_file: Path | None = Field(default=None, description="Server private key (PEM).")
    tls_ca_file: Path | None = Field(default=None, description="CA the CLI trusts when calling a TLS server.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="Mutual TLS: the server requires a client certificate signed by this CA (PEM); "
        "needs tls_cert_file and tls_key_file.",
    )
    tls_client_cert_file: Path | None = Field(
        default=None, description="The certificate the CLI presents to a mutual-TLS server (PEM)."
    )
    tls_client_key_file: Path | None = Field(default=None, description="...and its private key (PEM).")

    # Answering with the router (service/router.py; the trainer fits it, see service/settings.py)
    routing_coverage: float = Field(
        default=0.99, gt=0, le=1, description="Candidate tasks answer until they cover this probability..."
    )
    routing_max_candidates: int = Field(default=3, ge=1, description="...or this many have answered.")
    routing_label_scores: Literal["router-times-adapter", "adapter"] = Field(
        default="router-times-adapter",
        description="Candidates compared by router x adapter per (task, label), or p(task) x best label.",
    )
    named_label_scores: Literal["adapter", "router-times-adapter"] = Field(
        default="adapter",
        description="A request naming its task: its adapter's label probabilities, or those times the "
        "router's over the task's labels (each request then costs a second row, its base features).",
    )
    router_alone_above: float | None = Field(
        default=0.9,
        gt=0,
        le=1,
        description="A task-less request whose most probable (task, label) under the router is at least "
        "this probable is answered by the router alone, without an adapter forward (null: never; "
        "chosen on CLINC150 val, bench/README.md).",
    )

    # Drift
    drift_enabled: bool = True
    drift_window: int = Field(default=50, ge=5, description="Inputs (or predictions) judged at a time.")
    drift_reference_size: int = Field(default=200, ge=10, description="Reference texts per task.")
    drift_permutations: int = Field(default=200, ge=20, description="Permutations for the MMD p-value.")
    drift_alpha: float = Field(
        default=0.01, gt=0.0, lt=1.0, description="p-value under which a window drifted."
    )
    drift_sample_rate: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Fraction of Predict calls whose input is judged."
    )
    drift_max_samples_per_s: float = Field(
        default=10.0, ge=0.0, description="...at most this many a second per task on a server (0: no cap)."
    )
    drift_queue_size: int = Field(
        default=2000, ge=1, description="Inputs waiting to be judged; more are dropped."
    )
    drift_reaction: Literal["record", "adapt"] = Field(
        default="record",
        description="adapt: drift in a task's new training records closes the round at once.",
    )

    # Metrics (0 disables the endpoint)
    trainer_metrics_port: int = Field(default=9100, ge=0, le=65535)
    server_metrics_port: int = Field(default=9101, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("registry_url")
    @classmethod
    def _registry_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", value):
            raise ValueError(
                "a registry URL is s3://bucket/prefix (bucket: lower-case letters, digits, '.', '-')"
            )
        return value

    @field_validator("registry_s3_credentials_file")
    @classmethod
    def _credentials_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} does not exist")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ServingSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("tls_client_cert_file and tls_client_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                "tls_client_ca_file (mutual TLS) needs the server's own tls_cert_file and tls_key_file"
            )
        files = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_client_ca_file)
        for path in (*files, self.tls_client_cert_file, self.tls_client_key_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    def check_serving(self) -> None:
        """SettingsError if a server on these settings would let anyone who reaches it roll back or
        promote: bound beyond loopback with no admin_token, and not explicitly allowed."""
        if (
            self.admin_token is None
            and not self.allow_unauthenticated_admin
            and not _loopback(self.grpc_host)
        ):
            raise SettingsError(
                f"admin_token: the server binds grpc_host {self.grpc_host!r}, beyond loopback, where anyone "
                "could call Rollback and Promote; set admin_token (CONTINUAL_ADMIN_TOKEN), or set "
                "allow_unauthenticated_admin: true to serve admin calls to everyone"
            )

    def drift(self) -> DriftSettings:
        """The drift detectors' settings."""
        return DriftSettings(
            window=self.drift_window,
            reference_size=self.drift_reference_size,
            permutations=self.drift_permutations,
            alpha=self.drift_alpha,
            queue_size=self.drift_queue_size,
        )


def _loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve beyond this machine
