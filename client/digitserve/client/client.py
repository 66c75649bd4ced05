"""DigitClient: owns a channel and stub; deadlines on every call, retries on UNAVAILABLE and
CANCELLED (every method is idempotent); fails at once with ``ConnectError`` when it cannot reach
its server, unless told to wait (``wait_for_ready``). Every failure is a ``DigitServeError``
(``digitserve.client.errors``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from digitserve.client.connect import Connectivity
from digitserve.client.errors import CallError, ConnectError, from_grpc
from digitserve.client.images import (
    PREPROCESS,
    Picture,
    Preprocess,
    as_batch,
    load_picture,
    pictures_of,
    pixel_values,
    read_pictures,
)
from digitserve.client.messages import message_dict
from digitserve.client.security import secure_channel, token_metadata
from digitserve.metadata import stamp_version
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

SERVICE = "digitserve.v1.DigitService"
DEFAULT_TIMEOUT = 10.0
EVALUATE_BATCH = 1000
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# What a Predict request holds besides its images (model name, label, version), and what each
# image's field adds to its own size (tag and length): margins when a batch is split to fit
# MAX_MESSAGE_BYTES.
REQUEST_SLACK_BYTES = 64 * 1024
IMAGE_FRAMING_BYTES = 16
# gRPC reconnects to an unreachable server with exponential backoff, 120 s at most by default: a
# client waiting for a server to start (``wait_for_ready``, ``mnist-client --wait``) would see it
# up to two minutes late. A client of one service retries every few seconds at most instead.
MAX_RECONNECT_BACKOFF_MS = 2000

__all__ = ["DigitClient", "EvaluateResult", "PredictResult"]
T = TypeVar("T")

# gRPC's own retry machinery (service config): retried with exponential backoff on UNAVAILABLE
# (server starting, draining or a replica gone) and on CANCELLED, never on errors a retry can't
# fix. A server that shuts down fails the calls its transport accepted but the application had not
# yet picked up ("Server Shutdown" in grpc core's KillPendingWorkLocked) with RST_STREAM CANCEL,
# which the client reports as CANCELLED: at ~1k calls/s, a few per SIGTERM
# (tests/server/test_drain.py). Every method here is idempotent (Predict, Evaluate and GetModelInfo
# compute, health reads), so such a call is safe to send again, to another replica under
# round_robin. A cancel by this client itself is never retried by gRPC.
RETRY_SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [{
    "name": [{"service": SERVICE}, {"service": "grpc.health.v1.Health"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}}]}


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The defaults, each replaced by an ``extra`` option of the same name (gRPC itself would take
    the first of two and silently ignore the override)."""
    options: dict[str, Any] = {
        "grpc.enable_retries": 1, "grpc.service_config": json.dumps(RETRY_SERVICE_CONFIG),
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_reconnect_backoff_ms": MAX_RECONNECT_BACKOFF_MS, **dict(extra)}
    return list(options.items())


def encode_images(images: npt.ArrayLike) -> list[pb.Image]:
    """One Image per row of a (N, pixels) array (or per image of a (N, rows, cols) array): uint8
    pixels as raw bytes, anything else as packed float32 in [0, 1] (as given:
    ``images.pixel_values`` decides what a caller's array means)."""
    array = np.asarray(images)
    rows = array.reshape(array.shape[0] if array.ndim > 1 else 1, -1)
    if array.dtype == np.uint8:
        return [pb.Image(uint8=row.tobytes()) for row in rows]
    return [pb.Image(float32=row.tobytes()) for row in np.ascontiguousarray(rows, dtype="<f4")]


@dataclass(frozen=True)
class PredictResult:
    """Predictions of a batch: probabilities (N, classes), top class index and label per image;
    ``low_confidence_threshold`` the top-1 probability below which an answer is a guess
    (``low_confidence`` says which are)."""

    probabilities: npt.NDArray[np.float32]
    class_indices: list[int]
    labels: list[str]
    model_name: str
    model_version: int
    low_confidence_threshold: float = 0.0

    @property
    def top_probabilities(self) -> list[float]:
        """The probability of each image's top class."""
        return [float(self.probabilities[k, c]) for k, c in enumerate(self.class_indices)]

    @property
    def low_confidence(self) -> list[bool]:
        """Per image, whether its top probability is below ``low_confidence_threshold``: the
        answer the CLI warns of ("low confidence ... the answer may be a guess")."""
        return [p < self.low_confidence_threshold for p in self.top_probabilities]

    @classmethod
    def from_proto(cls, response: pb.PredictResponse) -> PredictResult:
        return cls.from_responses([response])

    @classmethod
    def from_responses(cls, responses: Sequence[pb.PredictResponse],
                       low_confidence_threshold: float = 0.0) -> PredictResult:
        """One result of the answers to a batch sent in several requests, in order; the model and
        version named are the first answer's (``DigitClient.predict`` pins the rest to it)."""
        found = [p for response in responses for p in response.predictions]
        return cls(np.array([p.probabilities for p in found], dtype=np.float32),
                   [p.class_index for p in found], [p.label for p in found],
                   responses[0].model_name, responses[0].model_version, low_confidence_threshold)


@dataclass(frozen=True)
class EvaluateResult:
    """What Evaluate returns, as plain Python values."""

    count: int
    accuracy: float
    mean_cross_entropy: float
    confusion_matrix: list[list[int]]
    labels: list[str]
    per_class: list[dict[str, Any]]
    model_name: str
    model_version: int

    @classmethod
    def from_proto(cls, response: pb.EvaluateResponse) -> EvaluateResult:
        per_class = [{"label": c.label, "precision": c.precision, "recall": c.recall, "f1": c.f1,
                      "support": c.support} for c in response.per_class]
        return cls(response.count, response.accuracy, response.mean_cross_entropy,
                   [list(row.counts) for row in response.confusion_matrix], list(response.labels),
                   per_class, response.model_name, response.model_version)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DigitClient:
    """A client of one target (``host:port``, or ``dns:///name:port`` / ``ipv4:a:p,b:p`` to spread
    calls round_robin over several servers). A refused call raises the ``errors.CallError``
    subclass of its status code. Until it has reached its server once, a call fails at once with
    ``ConnectError`` when the connection fails, unless ``wait_for_ready``; once connected, calls
    ride out a restart or a drain (they wait for the reconnect within their deadline)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, Any]] = (),
        wait_for_ready: bool = False,
        model_name: str = "",
    ) -> None:
        """``credentials``: TLS (client.security.tls_credentials); ``token``: a bearer token sent
        with every call; ``wait_for_ready``: wait for an unreachable server (within each call's
        deadline) instead of failing at once; ``model_name``: the model calls ask when they name
        none ("": the server's default model)."""
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.model_name = model_name
        self.channel = secure_channel(target, channel_options(options), credentials)
        self._metadata = token_metadata(token)
        self.stub = pb_grpc.DigitServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self._connectivity = Connectivity(self.channel, target)
        self._infos: dict[str, pb.GetModelInfoResponse] = {}  # by model name ("": the default)

    def __enter__(self) -> DigitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel: at once, or, when its connectivity was followed, a moment later
        in a daemon thread (Connectivity.close says why); calls already made are not waited for."""
        linger = self._connectivity.close()
        if not linger:
            self.channel.close()
            return
        closer = threading.Timer(linger, self.channel.close)
        closer.daemon = True
        closer.start()

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def wait_for_server(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds until the channel connects to the server; raises
        ConnectError (code DEADLINE_EXCEEDED) naming the last failure if it does not."""
        self._connectivity.wait_ready(timeout)

    def check_server(self, timeout: float | None = None) -> None:
        """Connects now: returns once the server accepts the connection, raises ConnectError at
        once when the attempt fails (nothing listening, a name that does not resolve), or after
        ``timeout`` seconds (default: the client's) without an answer. For a caller that talks
        to the server by other means (the load tester) and wants this client's quick answer."""
        self._connectivity.check(self._timeout(timeout))

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None,
              scale: float = 1.0) -> T:
        """``method(request)`` within the client's ``timeout`` (times ``scale``), the connection
        checked first while the server was never reached; a deadline or UNAVAILABLE while the
        channel cannot connect becomes ConnectError, any other failure its code's CallError."""
        timeout = self._timeout(timeout) * scale
        if not (self.wait_for_ready or self._connectivity.connected_once):
            self._connectivity.check(timeout)
        try:
            return method(request, timeout=timeout, wait_for_ready=True, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE) and (
                    error := self._connectivity.failure()) is not None:
                waited = timeout if code is grpc.StatusCode.DEADLINE_EXCEEDED else None
                raise ConnectError(self.target, error.reason, code, waited) from exc
            raise from_grpc(exc) from exc

    def _model(self, model_name: str) -> str:
        """The model a call asks: its own ``model_name``, else the client's."""
        return model_name or self.model_name

    def _served_info(self, model_name: str = "") -> pb.GetModelInfoResponse:
        """GetModelInfo of ``model_name`` ("": the client's model, else the server's default),
        asked once per model."""
        name = self._model(model_name)
        info = self._infos.get(name)
        if info is None:
            info = self._infos[name] = self.get_model_info(model_name=name)
        return info

    def _model_input_shape(self, model_name: str = "") -> tuple[int, ...]:
        """The input shape of ``model_name`` (GetModelInfo, asked once per model): what tells one
        rows×cols image from a batch of flat ones, and what an image that fits neither is told it
        needs."""
        response = self._served_info(model_name)
        return tuple(response.input_shape) or (response.input_size,)

    def low_confidence_threshold(self, model_name: str = "") -> float:
        """The top-1 probability below which the server counts an answer as low-confidence
        (``mnist-serve --low-confidence``; GetModelInfo, asked once per client); 0 from a server
        that does not say."""
        return float(self._served_info(model_name).low_confidence_threshold)

    def max_images_per_request(self, model_name: str = "") -> int:
        """The most images the server takes in one Predict (``mnist-serve
        --max-images-per-request``; GetModelInfo, asked once per model); 0 from a server that does
        not say."""
        return int(self._served_info(model_name).max_images_per_request)

    def _requests(self, images: list[pb.Image], name: str) -> list[list[pb.Image]]:
        """``images`` split into requests in order: each within the server's limit of images per
        request (asked only for a batch of several) and within the client's send limit."""
        limit = self.max_images_per_request(name) if len(images) > 1 else 0
        budget = MAX_MESSAGE_BYTES - REQUEST_SLACK_BYTES
        chunks: list[list[pb.Image]] = [[]]
        size = 0
        for image in images:
            cost = image.ByteSize() + IMAGE_FRAMING_BYTES
            if chunks[-1] and ((limit and len(chunks[-1]) >= limit) or size + cost > budget):
                chunks.append([])
                size = 0
            chunks[-1].append(image)
            size += cost
        return chunks

    def predict(
        self,
        images: npt.ArrayLike | Picture | Sequence[Picture],
        *,
        model_version: int = 0,
        model_name: str = "",
        label: str = "",
        timeout: float | None = None,
        preprocess: Preprocess = "client",
        low_confidence: float | None = None,
    ) -> PredictResult:
        """Probabilities for each image. ``images``: pixels of one image or a batch, as
        ``images.as_batch`` takes them for the model's rows×cols (GetModelInfo, asked once per
        model), or pictures: a PNG or JPEG file's bytes, its ``pathlib.Path``, or a list of them,
        turned into pixels here (``preprocess="client"``: 784 bytes travel, a bad file fails here)
        or by the server (``"server"``: the picture as ``Image.encoded``) with the same code.
        ``model_name``: the model to ask ("": the client's, else the server's default);
        ``model_version`` pins a version, or ``label`` names a version label ("stable",
        "canary"), not both. The result names the model and version that answered, and which
        answers are low-confidence (``PredictResult.low_confidence``): a top probability below
        ``low_confidence`` (default: the server's ``--low-confidence``, GetModelInfo).

        A batch over the server's limit of images per request (``max_images_per_request``) is
        sent as several requests, one after the other, each with its own deadline (``timeout``);
        the answers come back in order as one result. Unless ``model_version`` pins one, the
        first answer's version is pinned for the rest, so that one version answers the whole
        batch, as it would in one call. A refused request raises its ``errors.CallError``."""
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess={preprocess!r}: expected one of {', '.join(PREPROCESS)}")
        name = self._model(model_name)
        found = pictures_of(images)
        if found is None:
            batch = as_batch(images, self._model_input_shape(name))  # type: ignore[arg-type]
            encoded = encode_images(batch)
        elif preprocess == "server":
            encoded = [pb.Image(encoded=data) for data in read_pictures(found)]
        else:
            shape = self._model_input_shape(name)
            encoded = encode_images(np.stack([load_picture(p, shape) for p in found]))
        responses: list[pb.PredictResponse] = []
        for chunk in self._requests(encoded, name):
            request = pb.PredictRequest(images=chunk, model_version=model_version,
                                        model_name=name, version_label=label)
            responses.append(self._call(self.stub.Predict, request, timeout))
            model_version, label = responses[0].model_version, ""
        threshold = (self.low_confidence_threshold(name) if low_confidence is None
                     else low_confidence)
        return PredictResult.from_responses(responses, threshold)

    def evaluate(
        self,
        images: npt.ArrayLike,
        labels: npt.ArrayLike,
        *,
        batch_size: int = EVALUATE_BATCH,
        model_version: int = 0,
        model_name: str = "",
        label: str = "",
        timeout: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> EvaluateResult:
        """Streams the labelled set in batches; ``progress(n)`` is called as each batch is sent.
        ``images``: N×rows×cols or N×pixels, pixels as ``predict`` takes them; the model and its
        version as ``predict`` names them (one version answers the whole stream)."""
        name, array = self._model(model_name), pixel_values(images)
        array, y = array.reshape(array.shape[0], -1), np.asarray(labels, dtype=np.int64)

        def requests() -> Iterator[pb.EvaluateRequest]:
            for start in range(0, array.shape[0], batch_size):
                chunk = array[start : start + batch_size]
                yield pb.EvaluateRequest(images=encode_images(chunk),
                                         labels=y[start : start + batch_size].tolist(),
                                         model_version=model_version, model_name=name,
                                         version_label=label)
                if progress is not None:
                    progress(chunk.shape[0])

        return EvaluateResult.from_proto(self._call(self.stub.Evaluate, requests(), timeout, 6))

    def get_model_info(self, *, model_version: int = 0, model_name: str = "", label: str = "",
                       timeout: float | None = None) -> pb.GetModelInfoResponse:
        """GetModelInfo's response as it is (``model_info`` is it as a dict); the model and
        version as ``predict`` names them."""
        request = pb.GetModelInfoRequest(model_version=model_version,
                                         model_name=self._model(model_name), version_label=label)
        response: pb.GetModelInfoResponse = self._call(self.stub.GetModelInfo, request, timeout)
        return response

    def model_info(self, *, model_version: int = 0, model_name: str = "", label: str = "",
                   timeout: float | None = None) -> dict[str, Any]:
        """The model's metadata (metadata.json), with ``version``, ``max_images_per_request``,
        ``loaded_versions``, ``refused_versions``, ``inference_path`` and ``version_labels`` (the
        labels that name this version)."""
        response = self.get_model_info(model_version=model_version, model_name=model_name,
                                       label=label, timeout=timeout)
        info: dict[str, Any] = json.loads(response.metadata_json)
        stamp_version(info, response.model_version)
        info.update(max_images_per_request=response.max_images_per_request,
                    loaded_versions=list(response.loaded_versions),
                    refused_versions={str(r.version): r.reason for r in response.refused_versions},
                    inference_path=response.inference_path,
                    version_labels=list(response.version_labels))
        return info

    def list_models(self, model_name: str = "", *,
                    timeout: float | None = None) -> pb.ListModelsResponse:
        """ListModels's response as it is (``models`` is it as a dict): every model's state, default
        version, version labels, canary weight and versions; only ``model_name`` if given ("": all
        of them, not the client's default model)."""
        response: pb.ListModelsResponse = self._call(
            self.stub.ListModels, pb.ListModelsRequest(model_name=model_name), timeout)
        return response

    def models(self, model_name: str = "", *, timeout: float | None = None) -> dict[str, Any]:
        """ListModels's response as JSON values: fields by their proto names, enums by name
        (``MODEL_STATE_SERVING``), ``labels`` as an object of label -> version."""
        return message_dict(self.list_models(model_name, timeout=timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The health service's status name for ``service`` ("" = the whole server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        response = self._call(health_pb2_grpc.HealthStub(self.channel).Check,
                              health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout: float, service: str = "") -> str:
        """Polls health until SERVING or ``timeout`` seconds pass; returns the last status
        (UNREACHABLE if the server never answered)."""
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while True:
            try:
                status = self.health(service, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            except CallError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            if status == "SERVING" or time.monotonic() >= deadline:
                return status
            time.sleep(0.2)
