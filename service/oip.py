"""The Open Inference Protocol v2 (KServe, Triton) over gRPC: ``inference.GRPCInferenceService``.

KServe and Triton clients call the served adapters unchanged. A model is a task, its version the
task's adapter version (the served one; another is NOT_FOUND). ModelInfer takes one BYTES input of
UTF-8 texts (any name; shape [n] or [n, 1], in ``contents`` or ``raw_input_contents``) and returns,
one per text, ``label`` (BYTES) and ``score`` (FP32, the label's probability), as raw contents the way
Triton does. The calls a client needs are implemented: ServerLive, ServerReady, ModelReady,
ModelMetadata, ModelInfer; the rest of Triton's service answers UNIMPLEMENTED.
"""

from __future__ import annotations

import struct

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from service import calls
from service.answering import Answerer, Prediction, Request
from service.errors import ContinualError, InvalidArgument, NotFound
from service.server_metrics import ServerMetrics
from service.serving import AdapterPool, LoadedVersion

#: What ModelMetadata says runs a model.
PLATFORM = "continual"
OUTPUTS = ("label", "score")


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol's calls on top of the pool's served versions and the answerer."""

    def __init__(self, pool: AdapterPool, answerer: Answerer, metrics: ServerMetrics) -> None:
        self.pool = pool
        self.answerer = answerer
        self.metrics = metrics

    def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: grpc.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        """Live while the process answers."""
        return calls.handle(
            self.metrics, "ServerLive", context, lambda: service_pb2.ServerLiveResponse(live=True)
        )

    def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: grpc.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        """Ready once the server started (it loads what the registry serves before it listens)."""
        return calls.handle(
            self.metrics, "ServerReady", context, lambda: service_pb2.ServerReadyResponse(ready=True)
        )

    def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        """Whether the task (at that version, if one is named) is served."""

        def ready() -> service_pb2.ModelReadyResponse:
            try:
                self._served(request.name, request.version)
            except NotFound:
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=True)

        return calls.handle(self.metrics, "ModelReady", context, ready)

    def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        """The task's served version, one BYTES input and the two outputs."""

        def metadata() -> service_pb2.ModelMetadataResponse:
            loaded = self._served(request.name, request.version)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=loaded.task,
                versions=[str(loaded.version)],
                platform=PLATFORM,
                inputs=[tensor(name="text", datatype="BYTES", shape=[-1])],
                outputs=[
                    tensor(name="label", datatype="BYTES", shape=[-1]),
                    tensor(name="score", datatype="FP32", shape=[-1]),
                ],
            )

        return calls.handle(self.metrics, "ModelMetadata", context, metadata)

    def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        """Classify the input's texts with the task's served version; any text that cannot be
        answered fails the call with its status (the protocol has no per-item errors)."""

        def infer() -> service_pb2.ModelInferResponse:
            self._served(request.model_name, request.model_version)
            texts = _texts(request)
            wanted = [output.name for output in request.outputs] or list(OUTPUTS)
            unknown = sorted(set(wanted) - set(OUTPUTS))
            if unknown:
                raise InvalidArgument(f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
            requests = [Request(request.model_name, text) for text in texts]
            predictions: list[Prediction] = []
            for result in self.answerer.predict_many(requests, calls.deadline(context)):
                if isinstance(result, ContinualError):
                    raise result
                predictions.append(result)
            return _response(request, predictions, wanted)

        return calls.handle(self.metrics, "ModelInfer", context, infer)

    def _served(self, task: str, version: str) -> LoadedVersion:
        """The task's served version; NotFound if there is none, or if ``version`` names another."""
        with self.pool.serving() as (served, _):
            loaded = served.get(task)
        if loaded is None:
            raise NotFound(f"no model (task) {task[:80]!r} is served")
        if version and version != str(loaded.version):
            raise NotFound(f"model {task!r} serves version {loaded.version}, not {version[:20]!r}")
        return loaded


def _texts(request: service_pb2.ModelInferRequest) -> list[str]:
    """The one BYTES input's texts, from its contents or from the raw contents."""
    if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
        raise InvalidArgument("ModelInfer takes one input of datatype BYTES (the texts)")
    tensor = request.inputs[0]
    if request.raw_input_contents:
        items = _unpack_bytes(request.raw_input_contents[0])
    else:
        items = list(tensor.contents.bytes_contents)
    count = int(np.prod(tensor.shape)) if len(tensor.shape) else 0
    if count != len(items) or (len(tensor.shape) == 2 and tensor.shape[1] != 1) or len(tensor.shape) > 2:
        raise InvalidArgument(
            f"input shape {list(tensor.shape)} does not hold its {len(items)} texts as [n] or [n, 1]"
        )
    try:
        return [item.decode("utf-8") for item in items]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"a text is not UTF-8: {exc}") from None


def _unpack_bytes(raw: bytes) -> list[bytes]:
    """Triton's raw BYTES layout: each element a 4-byte little-endian length, then its bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument("raw BYTES input ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument("raw BYTES input ends inside an element")
        items.append(raw[offset : offset + length])
        offset += length
    return items


def _response(
    request: service_pb2.ModelInferRequest, predictions: list[Prediction], wanted: list[str]
) -> service_pb2.ModelInferResponse:
    """The wanted outputs as raw contents, in the order they were asked for."""
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=str(predictions[0].version), id=request.id
    )
    shape = [len(predictions)]
    for name in wanted:
        if name == "label":
            labels = [p.ranked[0][0].encode("utf-8") for p in predictions]
            raw = b"".join(struct.pack("<I", len(label)) + label for label in labels)
            response.outputs.add(name="label", datatype="BYTES", shape=shape)
        else:
            raw = np.array([p.ranked[0][1] for p in predictions], dtype="<f4").tobytes()
            response.outputs.add(name="score", datatype="FP32", shape=shape)
        response.raw_output_contents.append(raw)
    return response
