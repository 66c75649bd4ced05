"""Prometheus metrics and access logs: every call (through digitserve.server.calls), the batcher's batches,
the quality of the predictions, and model loads, in one registry per App."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from digitserve.inference import Model
from digitserve.metadata import Metadata

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

# Seconds per call: a Predict of one image takes about a millisecond here.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
MODEL_OUTCOMES = ("served", "refused")
CALL_LABELS = ("grpc_type", "grpc_service", "grpc_method")  # go-grpc-prometheus' labels of a call


class BulkHistogram(Collector):
    """A labelled Prometheus histogram that takes a whole array per observation (numpy bucket
    counts instead of one ``observe`` per value: 1024 values cost microseconds, not 2 ms), or one
    plain float (``observe_one``). Its observations come from one thread, the server's event
    loop, and update plain numbers without a lock (a scrape reads them from its own thread); the
    lock guards only the series' creation and the scrape's snapshot of them."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = np.asarray(sorted(set(buckets)), dtype=np.float64)
        self._bounds = self.bounds.tolist()
        self._edges = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()

    def _get(self, labels: tuple[str, ...]) -> tuple[list[int], list[float]]:
        series = self._series.get(labels)
        if series is None:
            with self._lock:
                series = self._series.setdefault(labels, ([0] * (len(self._bounds) + 1), [0.0]))
        return series

    def touch(self, labels: Sequence[str]) -> None:
        """Makes the series exist (all zero) before its first observation."""
        self._get(tuple(labels))

    def observe(self, labels: Sequence[str], values: npt.NDArray[np.floating[Any]]) -> None:
        # Bucket i counts values <= bounds[i] (Prometheus' "le"); the last one is +Inf.
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"),
                             minlength=len(self.bounds) + 1).tolist()
        buckets, value_sum = self._get(tuple(labels))
        for index, count in enumerate(counts):
            if count:
                buckets[index] += count
        value_sum[0] += float(np.sum(values, dtype=np.float64))

    def observe_one(self, labels: tuple[str, ...], value: float) -> None:
        """``observe`` for one plain float (bisect instead of numpy's per-call overhead)."""
        buckets, value_sum = self._series.get(labels) or self._get(labels)
        buckets[bisect.bisect_left(self._bounds, value)] += 1
        value_sum[0] += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(labels, list(b), s[0]) for labels, (b, s) in self._series.items()]
        for labels, buckets, value_sum in snapshot:
            family.add_metric(list(labels), list(zip(self._edges, itertools.accumulate(buckets),
                                                     strict=True)), value_sum)
        yield family


class ClassCounts(Collector):
    """``digitserve_predictions_total`` (images answered, by model version and predicted class)
    and ``digitserve_low_confidence_predictions_total`` as plain integers per model version,
    written by the event loop alone (like BulkHistogram) and read by a scrape."""

    PREDICTIONS = ("digitserve_predictions", "Images answered by Predict, by predicted class.")
    LOW = ("digitserve_low_confidence_predictions",
           "Images answered by Predict whose top-1 probability is below the low-confidence "
           "threshold (digitserve_low_confidence_threshold).")

    def __init__(self) -> None:
        # (model_name, model_version) -> (class labels, images per class, [low-confidence images])
        self._series: dict[tuple[str, str], tuple[list[str], list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def series(self, key: tuple[str, str], classes: Sequence[str]) -> tuple[list[int], list[int]]:
        """The counts of one model version (at zero until counted): per class, and low ones."""
        found = self._series.get(key)
        if found is None:
            with self._lock:
                found = self._series.setdefault(key, (list(classes), [0] * len(classes), [0]))
        return found[1], found[2]

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(*self.PREDICTIONS, labels=("model_name", "model_version", "class"))
        yield CounterMetricFamily(*self.LOW, labels=("model_name", "model_version"))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = [(key, classes, list(counts), low[0])
                        for key, (classes, counts, low) in self._series.items()]
        predictions = CounterMetricFamily(*self.PREDICTIONS,
                                          labels=("model_name", "model_version", "class"))
        low_family = CounterMetricFamily(*self.LOW, labels=("model_name", "model_version"))
        for key, classes, counts, low in snapshot:
            for label, count in zip(classes, counts, strict=True):
                predictions.add_metric([*key, label], count)
            low_family.add_metric(list(key), low)
        yield predictions
        yield low_family


class CallCounts:
    """One method's call metrics as plain numbers: go-grpc-prometheus' counters (calls started,
    messages received and sent), the calls finished by status code, and the histogram of their
    seconds. Written only on the server's event loop (one writer: no update is lost) and read by
    a scrape from any thread; the calls in flight are those started and not yet finished."""

    __slots__ = ("buckets", "finished", "handled", "received", "seconds", "sent", "started")

    def __init__(self) -> None:
        self.started = 0
        self.received = 0
        self.sent = 0
        self.finished = 0
        self.handled: dict[str, int] = {}  # status code name -> calls
        self.buckets = [0] * (len(CALL_BUCKETS) + 1)  # CALL_BUCKETS' "le", then +Inf
        self.seconds = 0.0

    def finish(self, code: str, seconds: float) -> None:
        """A call started before ended with status ``code`` after ``seconds``."""
        self.finished += 1
        handled = self.handled
        handled[code] = handled.get(code, 0) + 1
        self.buckets[bisect.bisect_left(CALL_BUCKETS, seconds)] += 1
        self.seconds += seconds


class MessageCounters(Collector):
    """The call metrics of every method, as go-grpc-prometheus names and labels them
    (``grpc_server_started_total``, ``grpc_server_msg_received_total``,
    ``grpc_server_msg_sent_total``, ``grpc_server_handled_total``,
    ``grpc_server_handling_seconds``) and ``grpc_server_in_flight_calls``, from each method's
    CallCounts, not prometheus-client metrics, whose every update takes a lock and several calls.
    The three counters first: the call interceptor around an empty unary behavior cost 909 more
    instructions per call with these integers, 15,416 more with three pre-labelled Counter
    children, against 46,939 without either (``PYTHONHASHSEED=0 valgrind --tool=callgrind python
    -m bench.call_cost interceptor --calls N``, 11,000 calls less 1,000). Then the rest (issue 26):
    a 1-image ModelInfer took 18,339 instructions fewer, 1,112,766 against 1,131,105 (``python -m
    bench.instructions --edge v2-grpc --shape 1x64``, access lines on in both).
    tests/server/test_grpc_metrics.py checks the exposition equals the stock metrics'."""

    _FAMILIES = (
        ("grpc_server_started", "Total number of RPCs started on the server.", "started"),
        ("grpc_server_msg_received", "Total number of RPC stream messages received on the server.",
         "received"),
        ("grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", "sent"),
    )
    HANDLED = ("grpc_server_handled", "Calls completed, by method and status code.")
    SECONDS = ("grpc_server_handling_seconds", "Time from the start of a call to its status, by method.")
    IN_FLIGHT = ("grpc_server_in_flight_calls", "Calls started and not yet completed, by method.")

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str, str], CallCounts] = {}
        self._lock = threading.Lock()
        self._edges = [repr(float(b)) for b in CALL_BUCKETS] + ["+Inf"]

    def of(self, grpc_type: str, service: str, method: str) -> CallCounts:
        """The counts of one method (the same object for the same labels), at zero until counted."""
        labels = (grpc_type, service, method)
        counts = self._methods.get(labels)
        if counts is None:
            with self._lock:
                counts = self._methods.setdefault(labels, CallCounts())
        return counts

    def describe(self) -> Iterator[Metric]:
        for name, documentation, _ in self._FAMILIES:
            yield CounterMetricFamily(name, documentation, labels=CALL_LABELS)
        yield CounterMetricFamily(*self.HANDLED, labels=(*CALL_LABELS, "grpc_code"))
        yield HistogramMetricFamily(*self.SECONDS, labels=CALL_LABELS)
        yield GaugeMetricFamily(*self.IN_FLIGHT, labels=CALL_LABELS)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            methods = list(self._methods.items())
        for name, documentation, attribute in self._FAMILIES:
            family = CounterMetricFamily(name, documentation, labels=CALL_LABELS)
            for labels, counts in methods:
                family.add_metric(labels, getattr(counts, attribute))
            yield family
        handled = CounterMetricFamily(*self.HANDLED, labels=(*CALL_LABELS, "grpc_code"))
        seconds = HistogramMetricFamily(*self.SECONDS, labels=CALL_LABELS)
        in_flight = GaugeMetricFamily(*self.IN_FLIGHT, labels=CALL_LABELS)
        for labels, counts in methods:
            # Read before the counts they are compared with: a call finishing meanwhile never
            # shows as a negative number in flight.
            finished, started = counts.finished, counts.started
            for code, calls in list(counts.handled.items()):
                handled.add_metric([*labels, code], calls)
            buckets, total = list(counts.buckets), counts.seconds
            seconds.add_metric(list(labels), list(zip(self._edges, itertools.accumulate(buckets),
                                                      strict=True)), total)
            in_flight.add_metric(list(labels), max(started - finished, 0))
        yield handled
        yield seconds
        yield in_flight


@dataclass
class _QualitySeries:
    key: tuple[str, str]  # (model_name, model_version)
    classes: list[int]  # images answered, by class index (ClassCounts)
    low: list[int]  # [images answered with low confidence]


class Telemetry:
    """All metrics of one server, in their own registry (so servers in one process, as in the
    tests, never share counters), and the HTTP endpoint that exposes them. It is the data
    plane's observer (batches, predictions, served models); digitserve.server.calls reports calls."""

    def __init__(self, *, low_confidence: float = 0.5, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.low_confidence = low_confidence
        self._http: WSGIServer | None = None
        # prometheus-client's WSGI app serves the metrics port, and answers the HTTP port's /metrics
        # (``exposition``): one negotiation of format and compression for both.
        self.metrics_app = make_wsgi_app(self.registry)
        self._by_model: dict[Model, _QualitySeries] = {}
        r = self.registry
        self.messages = MessageCounters()
        r.register(self.messages)
        self.batch_size = BulkHistogram(
            "digitserve_batch_size", "Images per model call made by the dynamic batcher.", (),
            BATCH_BUCKETS)
        self.queue_seconds = BulkHistogram(
            "digitserve_batch_queue_seconds",
            "Seconds the oldest call of a batch waited in the queue before the model ran it.", (),
            QUEUE_BUCKETS)
        for histogram in (self.batch_size, self.queue_seconds):
            histogram.touch(())
            r.register(histogram)
        self.queued_images = Gauge(
            "digitserve_queued_images", "Images waiting for the model now.", registry=r)
        self.model_info = Info("digitserve_model", "The version of each model served to unpinned "
                               "requests (the stable label's, when set).", ("model_name",), registry=r)
        self.loads = Counter(
            "digitserve_model_loads",
            "Versions tried when a model starts serving, by model and outcome (served or refused).",
            ("model_name", "outcome"), registry=r)
        self.reloads = Counter(
            "digitserve_model_reloads",
            "Versions tried by the watch (newer versions, labelled versions), by model and outcome "
            "(served or refused).", ("model_name", "outcome"), registry=r)
        model_labels = ("model_name", "model_version")
        # Its _count is the calls each version answered: a canary split shows there.
        self.model_request_seconds = BulkHistogram(
            "digitserve_model_request_seconds",
            "Seconds a Predict call spent in the data plane (queue and model), by the model "
            "version that answered it.", model_labels, CALL_BUCKETS)
        r.register(self.model_request_seconds)
        self.predictions = ClassCounts()
        r.register(self.predictions)
        self.confidence = BulkHistogram(
            "digitserve_prediction_confidence",
            "Top-1 probability of each image answered by Predict.",
            model_labels, (*CONFIDENCE_BUCKETS, low_confidence))
        r.register(self.confidence)
        Gauge("digitserve_low_confidence_threshold",
              "Top-1 probability below which an answer counts as low-confidence.",
              registry=r).set(low_confidence)

    # --- the data plane's observer -------------------------------------------------------------

    def on_batch(self, size: int, queue_seconds: float) -> None:
        self.batch_size.observe_one((), size)
        self.queue_seconds.observe_one((), queue_seconds)

    def on_model(self, model: Model) -> None:
        """A version starts serving: the info metric of its model says it, and its series appear
        at zero."""
        spec = model.spec
        self.model_info.labels(spec.name).info({
            "model_version": str(spec.version),
            "preset": Metadata.from_json(model.metadata).preset or "",
            "inference": model.inference_path})
        self._quality_series(model)

    def on_answered(self, model: Model, seconds: float) -> None:
        """A Predict call answered by ``model``, after ``seconds`` in the data plane."""
        series = self._by_model.get(model) or self._quality_series(model)
        self.model_request_seconds.observe_one(series.key, seconds)

    def _quality_series(self, model: Model) -> _QualitySeries:
        """The quality metrics' children of a model version (looking them up makes them appear
        at zero), kept by the model object itself (a few versions at most: the cache is emptied
        when it grows, as hot reloads replace them)."""
        series = self._by_model.get(model)
        if series is None:
            key = (model.spec.name, str(model.spec.version))
            series = _QualitySeries(key, *self.predictions.series(key, model.spec.labels))
            self.confidence.touch(key)
            self.model_request_seconds.touch(key)
            if len(self._by_model) >= 16:
                self._by_model.clear()
            self._by_model[model] = series
        return series

    def on_predictions(self, model: Model, probabilities: npt.NDArray[np.float32]) -> None:
        """The probabilities Predict calls got back (rows = images)."""
        n = probabilities.shape[0]
        if n == 0:
            return
        series = self._quality_series(model)
        if n == 1:  # the common call, in plain Python
            row = probabilities[0].tolist()
            top_value = max(row)
            series.classes[row.index(top_value)] += 1  # the first maximum, as argmax
            self.confidence.observe_one(series.key, top_value)
            if top_value < self.low_confidence:
                series.low[0] += 1
            return
        indices = probabilities.argmax(axis=1)
        top = probabilities.max(axis=1)
        counts = np.bincount(indices, minlength=len(series.classes)).tolist()
        for index, count in enumerate(counts):
            if count:
                series.classes[index] += count
        self.confidence.observe(series.key, top)
        low = int(np.count_nonzero(top < self.low_confidence))
        if low:
            series.low[0] += low

    # --- the App's hooks -----------------------------------------------------------------------

    def on_model_event(self, model_name: str, kind: str, version: int, outcome: str) -> None:
        """A version of ``model_name`` tried: ``kind`` is ``load`` (its first version),
        ``reload`` or ``label`` (the watch); ``outcome`` is ``served`` or ``refused``."""
        (self.loads if kind == "load" else self.reloads).labels(model_name, outcome).inc()

    def touch_model(self, model_name: str) -> None:
        """A model's load counters appear at zero."""
        for outcome in MODEL_OUTCOMES:
            self.loads.labels(model_name, outcome)
            self.reloads.labels(model_name, outcome)

    def watch_queue(self, queued_images: Callable[[], float]) -> None:
        self.queued_images.set_function(queued_images)

    # The metrics endpoint: seconds each read of a scrape's request may take (a half-sent request
    # is then dropped), and how many connections it serves at once (more are closed at once).
    metrics_read_timeout = 10.0
    metrics_max_connections = 16

    def serve(self, host: str, port: int) -> int:
        """Serves the registry as Prometheus text on http://host:port/metrics (0 picks a free
        port) from a daemon thread; returns the bound port. Raises OSError if it cannot bind.
        A half-sent request holds a thread for ``metrics_read_timeout``, never for good."""
        address = host.strip("[]")
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class = type("MetricsServer", (_MetricsServer,), {
            "address_family": family, "slots": threading.BoundedSemaphore(self.metrics_max_connections)})
        handler = type("MetricsHandler", (_MetricsHandler,), {"timeout": self.metrics_read_timeout})
        server: WSGIServer = make_server(str(sockaddr[0]), port, self.metrics_app, server_class, handler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def exposition(self, query: str, headers: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
        """A GET of the metrics port's ``/metrics?query`` with these request headers, answered by
        the app that serves that port (``metrics_app``), for another listener (the HTTP port's
        /metrics): the same format (``Accept: application/openmetrics-text`` gives OpenMetrics,
        else Prometheus text), compression (``Accept-Encoding: gzip``) and ``name[]`` filter.
        Returns the body and the response headers (Content-Type, Content-Encoding)."""
        environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query}
        for header, key in (("Accept", "HTTP_ACCEPT"), ("Accept-Encoding", "HTTP_ACCEPT_ENCODING")):
            if header in headers:
                environ[key] = headers[header]
        answer: dict[str, str] = {}

        def start_response(status: str, response_headers: Iterable[tuple[str, str]],
                           exc_info: Any = None) -> None:
            answer.update(response_headers)

        body = b"".join(self.metrics_app(environ, start_response))
        return body, answer

    async def close(self) -> None:
        """Stops the HTTP endpoint (if serving)."""
        server, self._http = self._http, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()


class _MetricsHandler(WSGIRequestHandler):
    """One scrape; no access line (a connection's ``timeout`` is set by Telemetry.serve)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``slots`` at once; a connection that fails (timed out,
    reset) is one DEBUG record, not socketserver's traceback on stderr."""

    daemon_threads = True
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            logger.debug("metrics endpoint: %s refused, all connections busy", client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics endpoint: connection from %s dropped", client_address[0], exc_info=True)


_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def request_id_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The caller's ``x-request-id`` when it is a sane token, else a new id: 32 hex digits, a
    random prefix per process and a counter (unique without a system call per request)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


# --- --workers N (digitserve.server.workers) -----------------------------------------------------------


def watch_workers(telemetry: Telemetry, serving: Callable[[], float], total: int) -> None:
    """How many of the ``--workers`` processes serve now, as every worker sees it (the shared
    state the parent keeps): below ``digitserve_workers`` while one is down or restarting."""
    Gauge("digitserve_workers_serving", "Worker processes serving now (--workers).",
          registry=telemetry.registry).set_function(serving)
    Gauge("digitserve_workers", "Worker processes configured (--workers).",
          registry=telemetry.registry).set(total)


def export_certificate_expiry(telemetry: Telemetry, not_after: float | None) -> None:
    """The served TLS certificate chain's expiry (Unix time) as a gauge, for an alert well before
    it (e.g. ``digitserve_tls_certificate_expiry_timestamp_seconds - time() < 14 * 86400``);
    absent without TLS."""
    if not_after is not None:
        Gauge("digitserve_tls_certificate_expiry_timestamp_seconds",
              "When the first certificate of the served TLS chain expires, as a Unix time.",
              registry=telemetry.registry).set(not_after)


class RepositoryMetrics:
    """The model repository's metrics, in a server's registry: reads that hung, the served
    version's directory gone, versions unloaded for it (App.reload_once)."""

    def __init__(self, registry: CollectorRegistry, hung_reads: Callable[[], float],
                 served_missing: Callable[[], bool]) -> None:
        self.timeouts = Counter(
            "digitserve_repository_timeouts",
            "Repository reads that did not return within --repository-timeout, by operation "
            "(list, fingerprint, load).", ("operation",), registry=registry)
        for operation in ("list", "fingerprint", "load"):
            self.timeouts.labels(operation)
        Gauge("digitserve_repository_hung_reads",
              "Repository reads past their timeout that have not returned yet.",
              registry=registry).set_function(hung_reads)
        Gauge("digitserve_served_version_missing",
              "1 while the served version's directory is gone from the repository.",
              registry=registry).set_function(lambda: float(served_missing()))
        self.unloads = Counter(
            "digitserve_model_unloads",
            "Loaded versions unloaded because their directory was gone for --removed-version-grace.",
            registry=registry)

    def on_timeout(self, operation: str) -> None:
        self.timeouts.labels(operation).inc()

    def on_unload(self) -> None:
        self.unloads.inc()


class ConfigMetrics:
    """The model config file's metrics (--model-config): changes that could not be applied, and
    whether the one in force is the file's latest."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter(
            "digitserve_model_config_errors",
            "Changes of the model config file that could not be applied (the previous config "
            "stayed in force).", registry=registry)
        self.ok = Gauge(
            "digitserve_model_config_ok",
            "1 while the config in force is the model config file's latest content, 0 while its "
            "latest change could not be applied.", registry=registry)
        self.ok.set(1)

    def on_error(self) -> None:
        self.errors.inc()
        self.ok.set(0)

    def on_applied(self) -> None:
        self.ok.set(1)
