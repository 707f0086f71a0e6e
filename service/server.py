"""The gRPC server: the servicer converts between protobuf and our types, nothing more.

Errors raised by the pool are mapped to status codes in one place (service.errors.status_of); every
call is counted and timed by method and code.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as oip_pb2
from tritonclient.grpc import service_pb2_grpc as oip_pb2_grpc

from service import calls
from service.answering import Answerer, Prediction, Request
from service.api import continual_pb2, continual_pb2_grpc
from service.errors import ContinualError, Unauthenticated, status_of
from service.evaluation import checkpointed_generative, learning_status
from service.generation_calls import GenerationCalls
from service.metrics import serve_metrics
from service.oip import InferenceServicer
from service.registry import Registry, open_registry
from service.replies import learning_reply, served_figures, version_info
from service.served_model import ServedModel, build_served_model
from service.server_metrics import ServerMetrics
from service.serving import AdapterPool, RegistryWatcher
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = continual_pb2.DESCRIPTOR.services_by_name["Continual"].full_name
OIP_SERVICE_NAME = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

Response = TypeVar("Response")

#: How many of a task's most recent events GetAdapter returns.
HISTORY_LENGTH = 20


class ContinualServicer(GenerationCalls, continual_pb2_grpc.ContinualServicer):
    """Implements continual.v1.Continual on top of an AdapterPool (Generate and GenerateBatch:
    ``service.generation_calls``)."""

    def __init__(self, pool: AdapterPool, metrics: ServerMetrics, admin_token: str | None) -> None:
        self.pool = pool
        self.answerer = Answerer(pool)
        self.metrics = metrics
        self._admin_token = admin_token

    def _call(
        self,
        method: str,
        context: grpc.ServicerContext,
        handler: Callable[[], Response],
        admin: bool = False,
    ) -> Response:
        def authorized() -> Response:
            if admin:
                self._authorize(context)
            return handler()

        return calls.handle(self.metrics, method, context, authorized)

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if self._admin_token is None:
            return
        metadata = dict(context.invocation_metadata())
        supplied = str(metadata.get("authorization", ""))
        if not hmac.compare_digest(supplied.encode(), f"Bearer {self._admin_token}".encode()):
            raise Unauthenticated("admin calls need the metadata 'authorization: Bearer <admin token>'")

    def Predict(
        self, request: continual_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> continual_pb2.PredictResponse:
        """Classify one text with the task's served adapter."""

        def handle() -> continual_pb2.PredictResponse:
            return _response(self.answerer.predict(_request(request), calls.deadline(context)))

        return self._call("Predict", context, handle)

    def PredictBatch(
        self, request: continual_pb2.PredictBatchRequest, context: grpc.ServicerContext
    ) -> continual_pb2.PredictBatchResponse:
        """Classify many texts; an item that fails carries its error, the others are answered."""

        def handle() -> continual_pb2.PredictBatchResponse:
            items = [_request(item) for item in request.items]
            results = self.answerer.predict_many(items, calls.deadline(context))
            return continual_pb2.PredictBatchResponse(results=[_result(r) for r in results])

        return self._call("PredictBatch", context, handle)

    def PredictStream(
        self, request_iterator: Iterator[continual_pb2.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[continual_pb2.PredictResult]:
        """Answer a stream of requests in order, up to ``stream_window`` of them in flight at once."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        requests = (_request(request) for request in request_iterator)
        try:
            window = self.pool.settings.stream_window
            for result in self.answerer.predict_stream(requests, calls.deadline(context), window):
                yield _result(result)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("PredictStream failed")
            raise
        finally:
            calls.record(self.metrics, "PredictStream", code, started)

    def ListAdapters(
        self, request: continual_pb2.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> continual_pb2.ListAdaptersResponse:
        """Every task in the registry with its served and latest versions."""

        def handle() -> continual_pb2.ListAdaptersResponse:
            return continual_pb2.ListAdaptersResponse(
                adapters=[self._info(task) for task in self.pool.registry.tasks()]
            )

        return self._call("ListAdapters", context, handle)

    def Rollback(
        self, request: continual_pb2.RollbackRequest, context: grpc.ServicerContext
    ) -> continual_pb2.AdapterInfo:
        """Serve an earlier version and pin it."""

        def handle() -> continual_pb2.AdapterInfo:
            loaded = self.pool.rollback(request.task, request.version, request.reason)
            log.warning("rollback: task %r now pinned to v%d", loaded.task, loaded.version)
            return self._info(loaded.task)

        return self._call("Rollback", context, handle, admin=True)

    def Promote(
        self, request: continual_pb2.PromoteRequest, context: grpc.ServicerContext
    ) -> continual_pb2.AdapterInfo:
        """Serve a version (the latest by default) and unpin."""

        def handle() -> continual_pb2.AdapterInfo:
            loaded = self.pool.promote(request.task, request.version, request.reason)
            log.info("promote: task %r now served by v%d", loaded.task, loaded.version)
            return self._info(loaded.task)

        return self._call("Promote", context, handle, admin=True)

    def ListVersions(
        self, request: continual_pb2.ListVersionsRequest, context: grpc.ServicerContext
    ) -> continual_pb2.ListVersionsResponse:
        """Every kept version of a task, newest first."""

        def handle() -> continual_pb2.ListVersionsResponse:
            registry = self.pool.registry
            versions = self.pool.versions(request.task)
            served = self._info(request.task).served_version
            rows = [
                version_info(version, registry.manifest(request.task, version), served)
                for version in reversed(versions)
            ]
            return continual_pb2.ListVersionsResponse(task=request.task, versions=rows)

        return self._call("ListVersions", context, handle, admin=True)

    def GetAdapter(
        self, request: continual_pb2.GetAdapterRequest, context: grpc.ServicerContext
    ) -> continual_pb2.AdapterDetail:
        """One task's adapter with why it is served and its recent history."""

        def handle() -> continual_pb2.AdapterDetail:
            self.pool.versions(request.task)  # NOT_FOUND / INVALID_ARGUMENT for bad tasks
            alias = self.pool.registry.alias(request.task)
            history = [
                continual_pb2.Event(
                    at=float(e["at"]),
                    event=str(e["event"]),
                    version=int(e["version"]),
                    reason=str(e["reason"]),
                )
                for e in self.pool.registry.events(request.task)[-HISTORY_LENGTH:]
            ]
            return continual_pb2.AdapterDetail(
                adapter=self._info(request.task), alias_reason=alias.reason if alias else "", history=history
            )

        return self._call("GetAdapter", context, handle, admin=True)

    def GetLearningStatus(
        self, request: continual_pb2.LearningStatusRequest, context: grpc.ServicerContext
    ) -> continual_pb2.LearningStatus:
        """ACC, BWT, FWT, forgetting and the accuracy matrix from the trainer's latest checkpoint."""

        def handle() -> continual_pb2.LearningStatus:
            registry = self.pool.registry
            checkpoint = registry.read_checkpoint()
            held = {**(checkpoint or {"tasks": {}})["tasks"], **checkpointed_generative(checkpoint)}
            manifests = {name: registry.manifest(name, int(saved["version"])) for name, saved in held.items()}
            return learning_reply(learning_status(checkpoint, manifests), manifests)

        return self._call("GetLearningStatus", context, handle)

    def _info(self, task: str) -> continual_pb2.AdapterInfo:
        registry = self.pool.registry
        versions = registry.versions(task)
        alias = registry.alias(task)
        # What this server answers with (0 until it has loaded one), not what the alias says: a
        # client that sees a served version can predict with it.
        served_version = self.pool.served_version(task)
        info = continual_pb2.AdapterInfo(
            task=task,
            served_version=served_version,
            latest_version=versions[-1] if versions else 0,
            pinned=bool(alias and alias.pinned),
            versions=versions,
        )
        if served_version:
            served_figures(info, registry.manifest(task, served_version))
        return info


def _request(request: continual_pb2.PredictRequest) -> Request:
    return Request(task=request.task, text=request.text, top_k=request.top_k)


def _response(prediction: Prediction) -> continual_pb2.PredictResponse:
    best_label, best_score = prediction.ranked[0]
    return continual_pb2.PredictResponse(
        task=prediction.task,
        label=best_label,
        score=best_score,
        top_k=[continual_pb2.ScoredLabel(label=label, score=score) for label, score in prediction.ranked],
        version=prediction.version,
        task_inferred=prediction.task_inferred,
        task_confidence=prediction.task_confidence,
        out_of_scope=prediction.out_of_scope,
    )


def _result(result: Prediction | ContinualError) -> continual_pb2.PredictResult:
    if isinstance(result, ContinualError):
        code, message = status_of(result)
        return continual_pb2.PredictResult(error=continual_pb2.ItemError(code=code.value[0], message=message))
    return continual_pb2.PredictResult(prediction=_response(result))


@dataclass
class RunningServer:
    """A started server and what it needs to be stopped."""

    grpc_server: grpc.Server
    port: int
    metrics_port: int
    pool: AdapterPool
    watcher: RegistryWatcher
    health: health.HealthServicer

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop taking calls, finish in-flight ones, stop watching the registry."""
        self.health.enter_graceful_shutdown()
        self.watcher.stop_event.set()
        self.grpc_server.stop(grace_s).wait()
        self.pool.engine.stop()
        self.pool.generation.stop()
        if self.pool.drift is not None:
            self.pool.drift.stop()

    def wait(self) -> None:
        """Block until the server stops."""
        self.grpc_server.wait_for_termination()


def start_server(
    settings: Settings, model: ServedModel | None = None, registry: Registry | None = None
) -> RunningServer:
    """Load what the registry serves, then start gRPC (with health and reflection) and /metrics.
    SettingsError, before anything loads, if the admin calls would be open beyond loopback or the
    registry's bucket refuses us (``registry`` defaults to the one the settings name)."""
    settings.check_serving()
    registry = registry or open_registry(settings)
    metrics_registry = CollectorRegistry()
    metrics = ServerMetrics(metrics_registry)
    model = model or build_served_model(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    pool = AdapterPool(settings, registry, model, metrics)
    pool.engine.start()
    pool.sync()
    watcher = RegistryWatcher(pool, settings.registry_poll_s)
    watcher.start()
    if pool.drift is not None:
        pool.drift.start()

    # A request thread's own tensors (routing, ranking) are tiny: on one torch thread each, not a team
    # of OpenMP threads per request thread that spin after every op on the cores the engine needs.
    request_threads = futures.ThreadPoolExecutor(
        settings.grpc_workers, initializer=torch.set_num_threads, initargs=(1,)
    )
    server = grpc.server(request_threads)
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    servicer = ContinualServicer(pool, metrics, token)
    continual_pb2_grpc.add_ContinualServicer_to_server(servicer, server)
    oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(pool, servicer.answerer, metrics), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bind = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        # Mutual TLS when a client CA is set: a client without a certificate it signed is refused.
        client_ca = settings.tls_client_ca_file
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
            root_certificates=client_ca.read_bytes() if client_ca is not None else None,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(bind, credentials)
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.grpc_host}:{settings.grpc_port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = serve_metrics(metrics_registry, settings.metrics_host, settings.server_metrics_port)
    log.info("serving gRPC on %s:%d, metrics on :%d", settings.grpc_host, port, metrics_port)
    return RunningServer(server, port, metrics_port, pool, watcher, health_servicer)
