"""Load generator: closed- and open-loop Predict traffic from several processes, measuring throughput,
latency percentiles, errors by status code, the accuracy of the answers and which model versions
gave them (the version mix: a canary split read off a run)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from digitserve.client.client import encode_images
from digitserve.client.errors import DigitServeError
from digitserve.idx import scale_pixels
from digitserve.loadtest import answers, http2
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.v1 import digit_service_pb2 as pb

PREDICT_METHOD = "/digitserve.v1.DigitService/Predict"
# digitserve: our API's Predict; oip: the Open Inference Protocol's (KServe V2) ModelInfer, with the
# pixels as raw_input_contents, input "images", output "probabilities": our server's V2 edge, and
# KServe or any V2 server serving a model with those names (bench/kserve_server.py).
METHODS = {"digitserve": PREDICT_METHOD, "oip": "/inference.GRPCInferenceService/ModelInfer"}
PROTOCOLS = tuple(METHODS)
OIP_INPUT, OIP_OUTPUT = "images", "probabilities"
ENCODINGS = ("uint8", "float32")
# h2: the tester's own HTTP/2 framing (digitserve.loadtest.http2), 92-129 µs of CPU per call here; grpc:
# grpc.aio, the stack of the client library, 230-270 µs (python -m bench.call_cost client).
ENGINES = ("h2", "grpc")
CALL_ERRORS = (grpc.aio.AioRpcError, http2.CallError)
CONNECT_RETRY_SECONDS = 0.1
# Connections per load process: SO_REUSEPORT spreads connections, not calls, over a server's
# workers, and with 2 connections both land on one of 2 workers half the time (measured: 2,100
# req/s at 64 in flight that way, 3,700 with 8 connections).
DEFAULT_CONNECTIONS = 8
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# One Python process on grpc.aio sends about 4-5k calls/s (the h2 engine spends less than half its
# CPU per call); above these loads a second process helps.
CALLS_PER_PROCESS = 16
RATE_PER_PROCESS = 2000.0
SPAWN_TIMEOUT = 60.0
# A load process stops when every call so far has failed, once this many have, or this many
# seconds into the run: a wrong model name or version fails each call the same way, and hammering
# the server for the whole duration tells nothing more.
FAIL_FAST_CALLS = 100
FAIL_FAST_SECONDS = 1.0
# Distinct (code, message) pairs of failed calls kept with their counts per load process, and
# shown in the report (the first ones seen; later ones are counted by code only).
ERROR_KINDS = 5
ExpectedFn = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


class LoadTestError(DigitServeError):
    """A load test that cannot run: settings out of range, no connection to the target within the
    connect timeout, or a load process that failed or overran."""


@dataclass(frozen=True)
class Workload:
    """Requests serialized once, the true labels of each request's images and, optionally, the
    exact probabilities expected for each request (to prove every answer is its own)."""

    payloads: tuple[bytes, ...]
    labels: tuple[npt.NDArray[np.int64], ...]
    batch: int
    encoding: str
    expected: tuple[npt.NDArray[np.float32], ...] | None = None
    protocol: str = "digitserve"

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def method(self) -> str:
        """The gRPC method the payloads are requests of."""
        return METHODS[self.protocol]


def _one_of(what: str, value: str, allowed: Sequence[str]) -> str | None:
    return None if value in allowed else f"{what} {value!r} is not one of {', '.join(allowed)}"


def build_workload(images: npt.NDArray[np.uint8], labels: npt.ArrayLike, *, batch: int = 1,
                   encoding: str = "uint8", model_version: int = 0,
                   expected: ExpectedFn | None = None, protocol: str = "digitserve",
                   model_name: str = "", label: str = "") -> Workload:
    """Cuts (N, ...) uint8 images into requests of ``batch`` consecutive images (wrapping round when
    N < batch) and serializes each once, as ``protocol``'s requests. ``model_name``: the model the
    requests name ("": the server's default model); ``model_version`` pins a version, ``label``
    names a version label instead (V2: as the request's model_version text).
    ``expected(float32 images) -> probabilities`` adds the exact answers to check."""
    if model_version and label:
        raise LoadTestError(f"model version {model_version} and label {label!r} both given: pin a "
                            "version or name a label, not both")
    problem = (f"batch {batch} must be at least 1" if batch < 1 else None) or \
        _one_of("encoding", encoding, ENCODINGS) or _one_of("protocol", protocol, PROTOCOLS)
    if problem:
        raise LoadTestError(problem)
    flat = np.asarray(images, dtype=np.uint8)
    flat = flat.reshape(flat.shape[0], -1)
    y = np.asarray(labels, dtype=np.int64)
    if flat.shape[0] == 0 or flat.shape[0] != y.shape[0]:
        raise LoadTestError(f"{flat.shape[0]} images and {y.shape[0]} labels; expected the same, > 0")
    payloads, request_labels, answers_ = [], [], []
    for r in range(max(1, flat.shape[0] // batch)):
        index = (r * batch + np.arange(batch)) % flat.shape[0]
        chunk = flat[index]
        if protocol == "oip":
            version = label or (str(model_version) if model_version else "")
            payloads.append(_infer_request(chunk, encoding, model_name, version))
        else:
            encoded = encode_images(chunk if encoding == "uint8" else scale_pixels(chunk))
            payloads.append(pb.PredictRequest(images=encoded, model_version=model_version,
                                              model_name=model_name,
                                              version_label=label).SerializeToString())
        request_labels.append(y[index])
        if expected is not None:
            answers_.append(np.asarray(expected(scale_pixels(chunk)), dtype=np.float32))
    return Workload(tuple(payloads), tuple(request_labels), batch, encoding,
                    tuple(answers_) if expected is not None else None, protocol)


def _infer_request(chunk: npt.NDArray[np.uint8], encoding: str, model_name: str,
                   model_version: str) -> bytes:
    """A serialized V2 ModelInferRequest of (N, size) images: raw little-endian pixels, FP32 in
    [0, 1] or UINT8, asking for the probabilities only."""
    pixels = chunk.tobytes() if encoding == "uint8" else scale_pixels(chunk).astype("<f4").tobytes()
    data: bytes = oip.ModelInferRequest(
        model_name=model_name, model_version=model_version,
        inputs=[oip.ModelInferRequest.InferInputTensor(
            name=OIP_INPUT, datatype="UINT8" if encoding == "uint8" else "FP32",
            shape=list(chunk.shape))],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=OIP_OUTPUT)],
        raw_input_contents=[pixels]).SerializeToString()
    return data


def _v2_probabilities(response: oip.ModelInferResponse) -> npt.NDArray[np.float32]:
    """The probabilities (rows = images) in a V2 ModelInferResponse. Raises ValueError when it
    holds no probabilities of shape [N, K]."""
    for i, output in enumerate(response.outputs):
        if output.name != OIP_OUTPUT:
            continue
        if i < len(response.raw_output_contents):
            values = np.frombuffer(response.raw_output_contents[i], dtype="<f4")
        else:
            values = np.asarray(output.contents.fp32_contents, dtype=np.float32)
        shape = [int(d) for d in output.shape]
        if output.datatype != "FP32" or len(shape) != 2 or values.size != shape[0] * shape[1]:
            raise ValueError(f"output {OIP_OUTPUT!r} is {output.datatype} {shape}, {values.size} values")
        return values.reshape(shape).astype(np.float32, copy=False)
    raise ValueError(f"no output {OIP_OUTPUT!r} in the answer")


@dataclass(frozen=True)
class LoadConfig:
    """How to drive the target. ``rate`` > 0 is an open loop (sends at fixed times regardless of
    answers, at most ``max_outstanding`` in flight); otherwise a closed loop of ``concurrency``
    callers. The run ends after ``duration`` seconds or ``requests`` calls, whichever comes first."""

    target: str
    concurrency: int = 1
    rate: float = 0.0
    duration: float = 10.0
    requests: int = 0
    processes: int = 1
    connections: int = 1
    timeout: float = 10.0
    connect_timeout: float = 10.0
    max_outstanding: int = 1000
    verify: bool = True
    engine: str = "h2"

    def __post_init__(self) -> None:
        checks = [(self.concurrency < 1, f"concurrency {self.concurrency} must be at least 1"),
                  (self.rate < 0, f"rate {self.rate} must not be negative"),
                  (self.duration <= 0, f"duration {self.duration} must be positive"),
                  (self.requests < 0, f"requests {self.requests} must not be negative"),
                  (self.processes < 1, f"processes {self.processes} must be at least 1"),
                  (self.connections < 1, f"connections {self.connections} must be at least 1"),
                  (self.timeout <= 0 or self.connect_timeout <= 0, "timeouts must be positive"),
                  (self.max_outstanding < 1,
                   f"max outstanding {self.max_outstanding} must be at least 1")]
        problems = [problem for failed, problem in checks if failed]
        if engine := _one_of("engine", self.engine, ENGINES):
            problems.append(engine)
        elif self.engine == "h2":
            try:
                http2.split_target(self.target)
            except ValueError as exc:
                problems.append(f"{exc}: engine h2 needs one (--engine grpc takes any gRPC target)")
        if problems:
            raise LoadTestError("; ".join(problems))

    @property
    def open_loop(self) -> bool:
        return self.rate > 0

    def effective_processes(self) -> int:
        """No more load processes than callers (closed loop) or requests."""
        limit = self.processes if self.open_loop else min(self.processes, self.concurrency)
        return max(1, min(limit, self.requests) if self.requests else limit)


def default_processes(concurrency: int, rate: float) -> int:
    """One process for light loads; for heavy ones, one per two CPUs at most: the other half is
    left to the server under test, which usually shares the machine (on 2 cores one process with
    two connections drives a Python server harder than two processes do). ``--processes`` sets
    more for a remote server."""
    wanted = math.ceil(rate / RATE_PER_PROCESS) if rate > 0 else math.ceil(concurrency / CALLS_PER_PROCESS)
    return max(1, min((os.cpu_count() or 1) // 2, wanted))


@dataclass(frozen=True)
class Plan:
    """One load process's share: callers or rate, request budget and where in the workload it starts."""

    index: int
    concurrency: int
    rate: float
    requests: int
    start: int
    phase: float


def split(config: LoadConfig, workload_size: int) -> list[Plan]:
    """Shares the load between processes. With a request count the processes take consecutive
    stretches of the workload, so together they send requests 0..N-1 (cyclically) exactly once."""
    n = config.effective_processes()
    plans, offset = [], 0
    for p in range(n):
        share = config.requests // n + (p < config.requests % n) if config.requests else 0
        start = offset if config.requests else p * workload_size // n
        offset += share
        plans.append(Plan(index=p, concurrency=config.concurrency // n + (p < config.concurrency % n),
                          rate=config.rate / n, requests=share, start=start % workload_size,
                          phase=p / config.rate if config.open_loop else 0.0))
    return plans


@dataclass
class ProcessResult:
    """What one load process measured: latencies in seconds of the successful calls and when each
    finished (time.monotonic(), the same clock in every process); ``messages``, the first
    ``ERROR_KINDS`` distinct (code, message) pairs of failed calls with counts; ``versions``, the
    answers by the (model name, version) that gave them; ``stopped``, stopped early because every
    call failed (``FAIL_FAST_CALLS``, ``FAIL_FAST_SECONDS``)."""

    latencies: Sequence[float]
    errors: dict[str, int]
    completions: Sequence[float] = ()
    ok: int = 0
    images: int = 0
    checked: int = 0
    correct: int = 0
    mismatches: int = 0
    finished: float = 0.0
    messages: dict[tuple[str, str], int] = field(default_factory=dict)
    versions: dict[answers.Answer, int] = field(default_factory=dict)
    stopped: bool = False


class _LocalCounter:
    """The calls made so far, for the progress bar (a shared RawValue across processes)."""

    value = 0


class _Recorder:
    """Counts calls and checks every answer against its own request's labels (and probabilities)."""

    def __init__(self, workload: Workload, verify: bool, counter: Any) -> None:
        self.workload, self.verify, self.counter = workload, verify, counter
        self.latencies: list[float] = []
        self.completions: list[float] = []
        self.errors: Counter[str] = Counter()
        self.messages: Counter[tuple[str, str]] = Counter()
        self.failed = 0
        self.begin = time.monotonic()  # when the run began (set by the driver): the fail-fast clock
        self.stopped = False  # every call failed (FAIL_FAST_*): the loops send no more
        self.versions: dict[answers.Answer, int] = {}  # get/set: cheaper than a Counter's +=
        self.result = ProcessResult(self.latencies, self.errors, self.completions,
                                    messages=self.messages, versions=self.versions)
        self._parse_version = answers.parser(workload.protocol)
        # Plain ints: numpy calls cost microseconds each, a comparison of ints tens of nanoseconds.
        self._labels = [tuple(int(k) for k in labels) for labels in workload.labels]

    def ok(self, index: int, answer: bytes, latency: float, now: float | None = None) -> None:
        """A successful call; ``now`` is when it finished (time.monotonic(), read if not given)."""
        finished = time.monotonic() if now is None else now
        self.latencies.append(latency)
        result = self.result
        result.ok += 1
        result.images += self.workload.batch
        result.finished = finished
        self.completions.append(finished)
        self.counter.value += 1
        if self.verify:
            self._check(index, answer)
            return
        try:  # the version mix only: two fields read by protobuf, the rest skipped in C
            parsed = self._parse_version(answer)
        except Exception:  # protobuf's DecodeError: an answer that is not one
            result.mismatches += 1
            return
        key = parsed.model_name, parsed.model_version
        self.versions[key] = self.versions.get(key, 0) + 1

    def error(self, code: str, details: str) -> None:
        """A failed call: its status code's name and the server's message."""
        now = time.monotonic()
        self.errors[code] += 1
        key = (code, details)
        if key in self.messages or len(self.messages) < ERROR_KINDS:
            self.messages[key] += 1
        self.failed += 1
        self.result.finished = now
        self.counter.value += 1
        if not self.result.ok and (self.failed >= FAIL_FAST_CALLS
                                   or now - self.begin >= FAIL_FAST_SECONDS):
            self.stopped = True

    def _check(self, index: int, answer: bytes) -> None:
        """Parses the answer once: the version that gave it, its classes against the labels, and
        its probabilities against the expected ones when the workload has them."""
        labels, expected, result = self._labels[index], self.workload.expected, self.result
        digitserve = self.workload.protocol == "digitserve"
        try:
            response: Any = (pb.PredictResponse if digitserve else oip.ModelInferResponse
                             ).FromString(answer)
        except Exception:  # protobuf's DecodeError: not an answer of the workload's protocol
            result.mismatches += 1
            return
        key: answers.Answer = response.model_name, response.model_version
        self.versions[key] = self.versions.get(key, 0) + 1
        try:
            if digitserve:
                predictions = response.predictions
                classes: Sequence[int] = [p.class_index for p in predictions]
                probabilities = None if expected is None or len(classes) != len(labels) else \
                    np.array([p.probabilities for p in predictions], dtype=np.float32)
            else:
                probabilities = _v2_probabilities(response)
                classes = probabilities.argmax(axis=1).tolist()
        except ValueError:  # no probabilities of the right shape
            classes = ()
        if len(classes) != len(labels):
            result.mismatches += 1
            return
        result.checked += len(labels)
        result.correct += sum(c == k for c, k in zip(classes, labels, strict=True))
        if expected is not None and probabilities is not None:
            want = expected[index]
            if probabilities.shape != want.shape or not np.allclose(probabilities, want, rtol=0,
                                                                    atol=1e-6):
                result.mismatches += 1

    def finish(self) -> ProcessResult:
        self.result.stopped = self.stopped
        return self.result


def _channel_options(index: int) -> list[tuple[str, Any]]:
    return [
        # A channel of its own per connection: without a local pool, channels share subchannels.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.channel_id", index),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        # Transparent retries only (the service config has no retryPolicy): a call the server
        # never took, as when a GOAWAY of --max-connection-age crosses it, is sent again, as the
        # h2 engine does; a call that failed is not.
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


async def _closed_loop(plan: Plan, calls: list[Any], workload: Workload, rec: _Recorder,
                       end: float) -> None:
    sent = 0
    size = len(workload)

    async def caller(c: int) -> None:
        nonlocal sent
        # Locals: this loop is the tester's own cost per call, beside gRPC's.
        call = calls[c % len(calls)]
        payloads, limit, start = workload.payloads, plan.requests, plan.start
        ok, monotonic = rec.ok, time.monotonic
        while True:
            started = monotonic()
            if started >= end or (limit and sent >= limit):
                return
            index = (start + sent) % size
            sent += 1
            try:
                answer = await call(payloads[index])
            except CALL_ERRORS as exc:
                rec.error(exc.code().name, exc.details() or "")
                if rec.stopped:
                    return
                continue
            now = monotonic()
            ok(index, answer, now - started, now)

    await asyncio.gather(*(caller(c) for c in range(plan.concurrency)))


async def _open_loop(plan: Plan, calls: list[Any], workload: Workload, rec: _Recorder, begin: float,
                     end: float, max_outstanding: int) -> None:
    """Sends call k at begin + phase + k / rate whatever the answers; latency runs from the planned
    time, so a stalled server (or a full outstanding cap) shows in it (no coordinated omission)."""
    slots = asyncio.Semaphore(max_outstanding)
    pending: set[asyncio.Task[None]] = set()

    async def one(k: int, due: float) -> None:
        index = (plan.start + k) % len(workload)
        try:
            answer = await calls[k % len(calls)](workload.payloads[index])
        except CALL_ERRORS as exc:
            rec.error(exc.code().name, exc.details() or "")
        else:
            rec.ok(index, answer, time.monotonic() - due)
        finally:
            slots.release()

    k = 0
    while not (plan.requests and k >= plan.requests):
        due = begin + plan.phase + k / plan.rate
        if due >= end or rec.stopped:
            break
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        await slots.acquire()
        if rec.stopped:  # while this one waited
            slots.release()
            break
        task = asyncio.create_task(one(k, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        k += 1
    await asyncio.gather(*pending)


async def _drive(plan: Plan, config: LoadConfig, workload: Workload, counter: Any,
                 ready: Callable[[], None], begin_at: Callable[[], float]) -> ProcessResult:
    """Connects, reports ready, waits for the common start time, then runs this process's share."""
    async with _connections(config, workload.method) as calls:
        rec = _Recorder(workload, config.verify, counter)
        ready()
        begin = await asyncio.get_running_loop().run_in_executor(None, begin_at)
        if (wait := begin - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        rec.begin = begin
        if config.open_loop:
            outstanding = max(1, config.max_outstanding // config.effective_processes())
            await _open_loop(plan, calls, workload, rec, begin, begin + config.duration, outstanding)
        else:
            await _closed_loop(plan, calls, workload, rec, begin + config.duration)
        return rec.finish()


@contextlib.asynccontextmanager
async def _connections(
    config: LoadConfig, method: str = PREDICT_METHOD
) -> AsyncIterator[list[Callable[[bytes], Awaitable[bytes]]]]:
    """``config.connections`` connections to the target, each as a function from a serialized
    request of ``method`` to its serialized answer (raising one of CALL_ERRORS)."""
    if config.engine == "h2":
        h2_channels: list[http2.Channel] = []
        try:
            for _ in range(config.connections):
                h2_channels.append(await _h2_connect(config, method))
            yield [channel.unary for channel in h2_channels]
        finally:
            for channel in h2_channels:
                channel.close()
        return
    channels = [grpc.aio.insecure_channel(config.target, options=_channel_options(i))
                for i in range(config.connections)]
    try:
        try:
            await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)),
                                   config.connect_timeout)
        except TimeoutError:
            raise LoadTestError(f"{config.target}: no connection within "
                                f"{config.connect_timeout:g}s") from None
        # request_serializer/response_deserializer None: the payloads are bytes already.
        # Registered, as generated stubs do: the method is interned once, not per call (~13 %
        # less CPU per call here).
        yield [functools.partial(ch.unary_unary(method, _registered_method=True),
                                 timeout=config.timeout) for ch in channels]
    finally:
        for ch in channels:
            await ch.close()


async def _h2_connect(config: LoadConfig, method: str) -> http2.Channel:
    """Connects as grpc's channel_ready() waits: refused attempts are retried until the connect
    timeout (a server may still be starting)."""
    deadline = time.monotonic() + config.connect_timeout
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            channel = http2.Channel(config.target, method, timeout=config.timeout,
                                    connect_timeout=config.connect_timeout)
            return await asyncio.wait_for(channel.open(), left)
        except OSError as exc:  # TimeoutError included
            if time.monotonic() + CONNECT_RETRY_SECONDS >= deadline:
                reason = "" if isinstance(exc, TimeoutError) else f" ({exc.strerror or exc})"
                raise LoadTestError(f"{config.target}: no connection within "
                                    f"{config.connect_timeout:g}s{reason}") from None
            await asyncio.sleep(CONNECT_RETRY_SECONDS)


def _child(plan: Plan, config: LoadConfig, workload: Workload, counter: Any, results: Any,
           go: Any, begin: Any) -> None:
    """A load process: runs its plan, puts ("done", index, result) or ("error", index, message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle

    def begin_at() -> float:
        if not go.wait(SPAWN_TIMEOUT + config.connect_timeout):
            raise LoadTestError("the load test never started")
        return float(begin.value)

    try:
        result = asyncio.run(_drive(plan, config, workload, counter,
                                    lambda: results.put(("ready", plan.index, None)), begin_at))
    except LoadTestError as exc:
        results.put(("error", plan.index, str(exc)))
    except Exception as exc:  # reported by the parent as one line
        results.put(("error", plan.index, f"load process {plan.index}: {exc!r}"))
    else:
        results.put(("done", plan.index, result))


@dataclass(frozen=True)
class LoadResult:
    """The merged measurements of a run: ``completion_times_s``, when each successful call
    finished in seconds since the run began; ``error_messages``, (code, the server's message,
    count) of the first few distinct errors, most frequent first; ``stopped_early``, the run
    stopped before its end because every call failed; ``versions``, (model name, version,
    answers) for each version that answered, by name, then version."""

    config: LoadConfig
    batch: int
    encoding: str
    processes: int
    duration_s: float
    ok: int
    errors: dict[str, int]
    images: int
    checked: int
    correct: int
    mismatches: int
    latencies_ms: npt.NDArray[np.float64] = field(repr=False)
    completion_times_s: npt.NDArray[np.float64] = field(repr=False)
    protocol: str = "digitserve"
    error_messages: tuple[tuple[str, str, int], ...] = ()
    stopped_early: bool = False
    versions: tuple[tuple[str, int | str, int], ...] = ()

    @property
    def requests(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.checked if self.checked else None

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else None

    def to_dict(self) -> dict[str, Any]:
        elapsed = self.duration_s or float("nan")
        answered = sum(count for *_, count in self.versions)
        latencies, open_loop = self.latencies_ms, self.config.open_loop
        return {
            "target": self.config.target, "mode": "open" if open_loop else "closed",
            "concurrency": None if open_loop else self.config.concurrency,
            "rate": self.config.rate if open_loop else None,
            "batch": self.batch, "encoding": self.encoding, "protocol": self.protocol,
            "processes": self.processes, "connections": self.config.connections * self.processes,
            "duration_s": round(self.duration_s, 4), "requests": self.requests, "ok": self.ok,
            "rps": round(self.ok / elapsed, 2), "images_per_s": round(self.images / elapsed, 2),
            "mean_ms": float(latencies.mean()) if latencies.size else None,
            "p50_ms": self.percentile(50), "p90_ms": self.percentile(90),
            "p99_ms": self.percentile(99),
            "max_ms": float(latencies.max()) if latencies.size else None,
            "errors": dict(sorted(self.errors.items())),
            "error_messages": [{"code": code, "message": message, "count": count}
                               for code, message, count in self.error_messages],
            "stopped_early": self.stopped_early, "accuracy": self.accuracy,
            "checked": self.checked, "mismatches": self.mismatches,
            "versions": [{"model_name": name, "model_version": version, "count": count,
                          "fraction": count / answered} for name, version, count in self.versions],
        }


def _merge(config: LoadConfig, workload: Workload, parts: Sequence[ProcessResult],
           begin: float) -> LoadResult:
    errors: Counter[str] = Counter()
    messages: Counter[tuple[str, str]] = Counter()
    versions: Counter[answers.Answer] = Counter()
    for part in parts:
        errors.update(part.errors)
        messages.update(part.messages)
        versions.update(part.versions)

    def total(name: str) -> int:
        return sum(getattr(p, name) for p in parts)

    return LoadResult(
        config=config, batch=workload.batch, encoding=workload.encoding, processes=len(parts),
        duration_s=max(max((p.finished for p in parts), default=begin) - begin, 1e-9),
        ok=total("ok"), errors=dict(errors), images=total("images"), checked=total("checked"),
        correct=total("correct"), mismatches=total("mismatches"),
        latencies_ms=np.fromiter(chain(*(p.latencies for p in parts)), np.float64) * 1000.0,
        completion_times_s=np.fromiter(chain(*(p.completions for p in parts)), np.float64) - begin,
        protocol=workload.protocol,
        error_messages=tuple((code, message, count) for (code, message), count
                             in messages.most_common(ERROR_KINDS)),
        stopped_early=bool(parts) and all(p.stopped for p in parts),
        versions=tuple((name, version, count) for (name, version), count
                       in sorted(versions.items(), key=lambda item: _version_order(item[0]))),
    )


def _version_order(answer: answers.Answer) -> tuple[str, int, int, str]:
    """By model name, then by version: numbers (and V2's decimal texts) in numeric order first."""
    name, version = answer
    text = str(version)
    if isinstance(version, int) or text.isdecimal():
        return name, 0, int(text), ""
    return name, 1, 0, text


class _Progress:
    """A tqdm bar on stderr: requests when the run is counted, seconds when it is timed."""

    def __init__(self, config: LoadConfig, enabled: bool) -> None:
        from tqdm import tqdm

        self.counted = bool(config.requests)
        self.bar = tqdm(
            total=config.requests if self.counted else config.duration,
            unit="req" if self.counted else "s", desc="loadtest", disable=None if enabled else True,
            bar_format=None if self.counted else "{l_bar}{bar}| {n:.0f}/{total:.0f}s{postfix}",
        )
        self.begin: float | None = None

    def update(self, completed: int) -> None:
        if self.begin is None:
            return
        elapsed = time.monotonic() - self.begin
        self.bar.n = completed if self.counted else min(elapsed, float(self.bar.total))
        self.bar.set_postfix_str(f"{completed} req, {completed / max(elapsed, 1e-9):.0f} req/s",
                                 refresh=False)
        self.bar.refresh()


def run(config: LoadConfig, workload: Workload, *, progress: bool = False) -> LoadResult:
    """Runs the load test and merges what every load process measured. Raises LoadTestError."""
    if config.open_loop and config.requests:
        config = replace(config, duration=config.requests / config.rate + 1e-6)
    plans = split(config, len(workload))
    bar = _Progress(config, progress)
    try:
        if len(plans) == 1:
            return _run_here(plans[0], config, workload, bar)
        return _run_processes(plans, config, workload, bar)
    except KeyboardInterrupt:
        raise LoadTestError("interrupted") from None
    finally:
        bar.bar.close()


def _run_here(plan: Plan, config: LoadConfig, workload: Workload, bar: _Progress) -> LoadResult:
    counter = _LocalCounter()

    def start_now() -> float:
        bar.begin = time.monotonic()
        return bar.begin

    async def main() -> ProcessResult:
        async def tick() -> None:
            while True:
                await asyncio.sleep(0.2)
                bar.update(counter.value)

        ticker = asyncio.create_task(tick())
        try:
            return await _drive(plan, config, workload, counter, lambda: None, start_now)
        finally:
            ticker.cancel()

    part = asyncio.run(main())
    bar.update(counter.value)
    return _merge(config, workload, [part], bar.begin or 0.0)


def _run_processes(plans: list[Plan], config: LoadConfig, workload: Workload,
                   bar: _Progress) -> LoadResult:
    ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC threads
    results, go, begin = ctx.Queue(), ctx.Event(), ctx.RawValue("d", 0.0)
    counters = [ctx.RawValue("q", 0) for _ in plans]
    procs = [ctx.Process(target=_child, args=(plan, config, workload, counters[plan.index], results,
                                              go, begin), name=f"loadtest-{plan.index}", daemon=True)
             for plan in plans]
    parts: dict[int, ProcessResult] = {}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + SPAWN_TIMEOUT + config.connect_timeout
        for _ in procs:
            _next(results, procs, deadline, "the load processes did not connect in time")
        begin.value = bar.begin = time.monotonic() + 0.05
        go.set()
        deadline = begin.value + config.duration + config.timeout + 30
        while len(parts) < len(procs):
            index, payload = _next(results, [], deadline, "a load process overran its time limit",
                                   lambda: bar.update(sum(c.value for c in counters)))
            parts[index] = payload
        bar.update(sum(c.value for c in counters))
    finally:
        go.set()
        for proc in procs:  # after an error or Ctrl-C, the others are stopped
            proc.join(0 if len(parts) < len(procs) else 5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    return _merge(config, workload, [parts[i] for i in sorted(parts)], begin.value)


def _next(results: Any, starting: list[Any], deadline: float, late: str,
          waiting: Callable[[], None] = lambda: None) -> tuple[int, Any]:
    """The next (index, result) a load process puts ("ready" or "done"), calling ``waiting`` every
    0.2 s meanwhile; LoadTestError with the message of one that failed, when one of ``starting``
    died, or ``late`` past ``deadline``."""
    while True:
        try:
            kind, index, payload = results.get(timeout=0.2)
        except queue.Empty:
            dead = [p.name for p in starting if p.exitcode not in (None, 0)]
            if dead:
                raise LoadTestError(f"load process {dead[0]} died before starting") from None
            if time.monotonic() > deadline:
                raise LoadTestError(late) from None
            waiting()
            continue
        if kind == "error":
            raise LoadTestError(str(payload))
        return index, payload


def format_result(result: LoadResult) -> str:
    """A few human-readable lines."""
    d = result.to_dict()
    shape = (f"open loop at {d['rate']:g} req/s" if d["mode"] == "open"
             else f"closed loop, {d['concurrency']} in flight")
    ms = {k: "–" if d[k] is None else f"{d[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")}
    lines = [
        f"{d['target']}: {shape}, {d['batch']} image(s)/request ({d['encoding']}"
        f"{', V2 ModelInfer' if d['protocol'] == 'oip' else ''}), "
        f"{d['processes']} load process(es), {d['duration_s']:.2f} s",
        f"requests    {d['requests']} ({d['ok']} ok)",
        f"throughput  {d['rps']:.1f} req/s, {d['images_per_s']:.1f} images/s",
        f"latency ms  p50 {ms['p50_ms']}  p90 {ms['p90_ms']}  p99 {ms['p99_ms']}  max {ms['max_ms']}",
    ]
    if d["accuracy"] is not None:
        lines.append(f"accuracy    {d['accuracy']:.4f} ({d['checked']} answers checked)")
    if d["mismatches"]:
        lines.append(f"mismatches  {d['mismatches']} answers did not fit their request")
    if result.versions:
        lines.append(f"versions    {format_versions(result)}")
    lines.append(f"errors      {', '.join(f'{k} {v}' for k, v in d['errors'].items()) or 'none'}")
    lines += [f"{count:>11} × {code}: {_shorten(message)}" for code, message, count in result.error_messages]
    if result.stopped_early:
        lines.append(f"stopped     early: all of the first {d['requests']} calls failed")
    return "\n".join(lines)


def format_versions(result: LoadResult) -> str:
    """The version mix of the answers, per model: ``mnist 3: 4,512 (90.2 %), 4: 488 (9.8 %)``
    (``(no name)`` for answers without a model name); ``none`` without answers read."""
    total = sum(count for *_, count in result.versions)
    models: dict[str, list[str]] = {}
    for name, version, count in result.versions:
        models.setdefault(name, []).append(f"{version}: {count:,} ({100 * count / total:.1f} %)")
    return "; ".join(f"{name or '(no name)'} {', '.join(parts)}"
                     for name, parts in models.items()) or "none"


def error_summary(result: LoadResult) -> str | None:
    """One line for a run with failed calls (None without): how many failed, by code, and the
    server's most frequent message; says so when the run stopped early because every call failed."""
    if not result.errors:
        return None
    failed = sum(result.errors.values())
    by_code = ", ".join(f"{k} {v}" for k, v in sorted(result.errors.items()))
    head = (f"stopped after {result.duration_s:.2f} s: all {failed} requests failed ({by_code})"
            if result.stopped_early else f"{failed} of {result.requests} requests failed ({by_code})")
    if not result.error_messages:
        return head
    code, message, _ = result.error_messages[0]
    return f"{head}; most frequent: {code}: {_shorten(message)}"


def _shorten(message: str, limit: int = 300) -> str:
    message = " ".join(message.split()) or "(no message)"
    return message if len(message) <= limit else message[: limit - 1] + "…"
