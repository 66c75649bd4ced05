"""The gRPC server and what every call goes through: one grpc.aio server interceptor gives each call a
request id, the bearer-token check, the drain's hold, metrics and the access line, and the services
are added by their generated ``add_*_to_server`` functions.

One interceptor rather than one per concern: grpc.aio runs each as one more coroutine per call, and
a call refused by the token or the drain must still be counted and logged like any other, by the
same wrapper. The interceptor wraps a method's handler the first time the method is called and keeps
it (grpc resolves a method to the same handler for the server's life), so a call costs grpc's
interceptor chain and one dict lookup: within noise of the hand-wrapped handlers it replaced
(``bench/callgrind.sh TREE REPO mnist 300 1``, means of three runs: 1,092,196 instructions per 1-image
Predict against 1,091,503 on 6feecb6; ``WARMUP=10 ... 30 64``, of two: 3,958,477 per 64-image
Predict against 3,963,385)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc._cython.cygrpc import ExecuteBatchError as CallGone  # an operation on a call already ended

from digitserve.server.drain import REFUSED, Drain
from digitserve.server.logs import access_log, current_request_id
from digitserve.server.security import TokenAuth
from digitserve.server.status import Undecodable
from digitserve.server.telemetry import REQUEST_ID_KEY, CallCounts, Telemetry, request_id_of
from digitserve.server.wire import parse_predict_request
from digitserve.v1 import digit_service_pb2 as pb

logger = logging.getLogger(__name__)

HEALTH = "/grpc.health.v1.Health/"  # never held by the drain (it answers NOT_SERVING)
# (handler.request_streaming, handler.response_streaming) -> grpc_type label, handler attribute, constructor
_KINDS = {
    (False, False): ("unary", "unary_unary", grpc.unary_unary_rpc_method_handler),
    (True, False): ("client_stream", "stream_unary", grpc.stream_unary_rpc_method_handler),
    (False, True): ("server_stream", "unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, True): ("bidi_stream", "stream_stream", grpc.stream_stream_rpc_method_handler),
}
# Requests read by something faster than protobuf (digitserve.server.wire), by message type.
_PARSERS: dict[str, Callable[[bytes], Any]] = {pb.PredictRequest.DESCRIPTOR.full_name: parse_predict_request}


def tolerant_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bytes that do not parse become ``Undecodable``,
    which status.mapped_errors answers INVALID_ARGUMENT (grpc would answer UNKNOWN, or hand a
    stream's method an unexpected exception)."""
    type_name = message_class.DESCRIPTOR.full_name
    from_string = _PARSERS.get(type_name, message_class.FromString)

    def parse(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError:
            return Undecodable(type_name)

    return parse


def _serializer(message_class: Any) -> Callable[[Any], bytes]:
    """Serializes a response message; a method may also answer bytes it serialized itself."""

    def serialize(response: Any) -> bytes:
        return response if isinstance(response, bytes) else bytes(message_class.SerializeToString(response))

    return serialize


class GenericOnly:
    """A grpc.aio.Server as the generated ``add_*Servicer_to_server`` functions see it: each adds a
    service's generic handler, then its registered methods, which this drops, so that the generic
    handler serves them. grpc.aio's main loop waits on one pending request per registered method
    (``asyncio.wait`` over all of them for every call): with the ~17 methods served here that
    costs 7.6% more instructions per 1-image Predict (``bench/callgrind.sh TREE REPO mnist 300 1``
    on this tree with ``services = server`` in app.grpc_server, means of two runs: 1,171,998
    against 1,089,656). tests/server/test_calls.py checks both ways answer alike."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.add_generic_rpc_handlers = server.add_generic_rpc_handlers

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Dropped: the generic handler added just before serves these methods."""


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Each call gets a request id (the caller's ``x-request-id`` or a new one, echoed in the
    trailing metadata and put on every log record made while serving it), is refused
    UNAUTHENTICATED without an accepted token (when ``auth`` is set; health stays open), and is
    counted, timed and logged whatever its outcome. Once ``drain`` has started, a call that arrives
    is held, then refused UNAVAILABLE (digitserve.server.drain); health checks are not held. Every
    behavior is wrapped, synchronous ones too (they then run in a thread, as grpc.aio would run
    them): none escapes the token check (tests/server/test_auth_coverage.py). The methods of
    ``tolerant`` services get deserializers that never raise (``tolerant_deserializer``)."""

    def __init__(self, telemetry: Telemetry, auth: TokenAuth | None = None, drain: Drain | None = None,
                 tolerant: Iterable[ServiceDescriptor] = ()) -> None:
        self._telemetry = telemetry
        self._auth = auth
        self._drain = drain
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._coders = {
            f"/{service.full_name}/{method.name}": (
                tolerant_deserializer(message_factory.GetMessageClass(method.input_type)),
                _serializer(message_factory.GetMessageClass(method.output_type)))
            for service in tolerant for method in service.methods}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(details.method)
        if handler is None:  # the method's first call (an unknown method is never kept)
            handler = await continuation(details)
            if handler is not None:
                handler = self._handlers[details.method] = self.wrap(details.method, handler)
        return handler

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = (handler.request_streaming, handler.response_streaming)
        kind, attribute, make = _KINDS[streaming]
        auth = self._auth if self._auth is not None and not self._auth.is_open(method) else None
        drain = None if method.startswith(HEALTH) else self._drain
        behavior = _wrap(getattr(handler, attribute), MethodMetrics(self._telemetry, kind, method),
                         auth, streaming, drain)
        parse, write = self._coders.get(method, (handler.request_deserializer, handler.response_serializer))
        wrapped: grpc.RpcMethodHandler = make(behavior, request_deserializer=parse, response_serializer=write)
        return wrapped

    def touch(self, services: Iterable[ServiceDescriptor]) -> None:
        """The call metrics of every method of ``services`` appear at zero."""
        for service in services:
            for m in service.methods:
                MethodMetrics(self._telemetry, _KINDS[m.client_streaming, m.server_streaming][0],
                              f"/{service.full_name}/{m.name}")


async def _admit(context: grpc.aio.ServicerContext[Any, Any], metadata: Any, method: str,
                 auth: TokenAuth | None, drain: Drain | None) -> None:
    """Aborts a call without an accepted token, and holds then refuses one that came during a drain."""
    if auth is not None and (problem := auth.check(metadata)) is not None:
        logger.info("unauthenticated call to %s from %s: %s", method, context.peer(), problem)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
    if drain is not None and drain.started:
        await drain.hold()
        await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)


def _wrap(
    behavior: Callable[..., Any], metrics: MethodMetrics, auth: TokenAuth | None,
    streaming: tuple[bool, bool], drain: Drain | None,
) -> Callable[..., Any]:
    """The behavior inside a Call, keeping its flavour (coroutine or async generator), which
    grpc.aio inspects to decide how to run it. A synchronous behavior becomes one of those too,
    run in a thread as grpc.aio itself would run it, so that it is observed and needs the token
    like every other."""
    method = metrics.method
    counts = metrics.counts
    request_streaming, response_streaming = streaming
    if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
        behavior = _threaded(behavior, *streaming)
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            metadata = context.invocation_metadata()
            call = Call(metrics, request_id_of(metadata), context)
            if request_streaming:
                request = _counted(request, counts)
            else:
                counts.received += 1
            try:
                if auth is not None or (drain is not None and drain.started):
                    await _admit(context, metadata, method, auth, drain)
                async for response in behavior(request, _CountingContext(context, counts)):
                    yield response
                    counts.sent += 1  # grpc.aio asks for the next one once this one is written
            except BaseException as exc:
                # GeneratorExit: the stream was closed, maybe long after grpc ended the call
                # (an abandoned stream, collected later): outcome() does not touch the context.
                call.finish(outcome(exc, context))
                raise
            call.finish(outcome(None, context))

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        # A unary response, or a stream the behavior writes with context.write (grpc_health's Watch).
        metadata = context.invocation_metadata()
        call = Call(metrics, request_id_of(metadata), context)
        if request_streaming:
            request = _counted(request, counts)
        else:
            counts.received += 1
        try:
            if auth is not None or (drain is not None and drain.started):
                await _admit(context, metadata, method, auth, drain)
            if request_streaming or response_streaming:
                response = await behavior(request, _CountingContext(context, counts))
            else:
                response = await behavior(request, context)
        except CallGone as exc:
            # The answer (an abort's status) could not be sent: the call ended on the client's
            # side first. Cancelled, as grpc would have cancelled it: without this, grpc tries
            # to send a status once more and prints the failure's traceback on stderr.
            call.finish(grpc.StatusCode.CANCELLED)
            raise asyncio.CancelledError from exc
        except BaseException as exc:
            call.finish(outcome(exc, context))
            raise
        code = outcome(None, context)
        call.finish(code)
        if code is OK and not response_streaming:  # go-grpc-prometheus: a message sent when no error
            counts.sent += 1
        return response

    return unary


OK = grpc.StatusCode.OK


async def _counted(requests: AsyncIterator[Any], counts: CallCounts) -> AsyncIterator[Any]:
    """A call's request stream, each message counted as it is read."""
    async for request in requests:
        counts.received += 1
        yield request


class _CountingContext:
    """A streaming call's servicer context as its behavior sees it: the messages it reads with
    ``read`` and writes with ``write`` are counted; everything else is the context's own."""

    __slots__ = ("_context", "_counts")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], counts: CallCounts) -> None:
        self._context = context
        self._counts = counts

    async def read(self) -> Any:
        request = await self._context.read()
        if request is not grpc.aio.EOF:
            self._counts.received += 1
        return request

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._counts.sent += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


_END = object()


def _threaded(
    behavior: Callable[..., Any], request_streaming: bool, response_streaming: bool
) -> Callable[..., Any]:
    """A synchronous behavior as a coroutine function (an async generator function when it
    answers with a stream, an iterator) that runs it in a thread with the caller's context
    variables (the request id). A request stream reaches it as a plain iterator."""

    def requests_of(request: Any, loop: asyncio.AbstractEventLoop) -> Any:
        return _blocking_iterator(request, loop) if request_streaming else request

    if response_streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            loop = asyncio.get_running_loop()
            responses = iter(await asyncio.to_thread(behavior, requests_of(request, loop), context))
            while (response := await asyncio.to_thread(next, responses, _END)) is not _END:
                yield response

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(behavior, requests_of(request, loop), context)

    return unary


def _blocking_iterator(requests: Any, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """grpc.aio's request stream (an async iterator) read from a worker thread."""
    iterator = aiter(requests)

    async def following() -> Any:
        return await anext(iterator, _END)

    while (request := asyncio.run_coroutine_threadsafe(following(), loop).result()) is not _END:
        yield request


class MethodMetrics:
    """One method's call metrics (telemetry.CallCounts), looked up once, not per call."""

    __slots__ = ("counts", "method")

    def __init__(self, telemetry: Telemetry, kind: str, method: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        self.method = method
        self.counts = telemetry.messages.of(kind, service, name)


class Call:
    """One call being observed: in flight while it runs, then counted, timed and logged. Its
    request id goes into the trailing metadata at once: it travels with the status at no extra
    cost, where initial metadata would be one more operation per call; an abort keeps it
    (status.mapped_errors adds its details after it).

    It keeps no reference to the call's ``ServicerContext``: what the access line needs (the peer)
    is read here, while the call is alive, and ``finish`` takes the status code its caller read
    while it still was (``outcome``). A streaming handler can be finished long after grpc ended
    the call (an abandoned stream's generator is closed when it is collected), and a context
    touched then reads a freed grpc call: the SIGSEGV of issue 21."""

    __slots__ = ("metrics", "peer", "request_id", "started", "token")

    def __init__(self, metrics: MethodMetrics, request_id: str,
                 context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.peer = context.peer() if access_log.enabled() else ""
        self.token = current_request_id.set(request_id)
        self.started = time.perf_counter()
        metrics.counts.started += 1
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))

    def finish(self, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - self.started
        code_name = code.name
        metrics = self.metrics
        metrics.counts.finish(code_name, seconds)
        if access_log.enabled():
            access_log.write(metrics.method, code_name, round(seconds * 1000, 3), self.peer,
                             self.request_id)
        try:  # noqa: SIM105  (contextlib.suppress costs more, on every call)
            current_request_id.reset(self.token)
        except ValueError:  # finished in another context (a stream closed elsewhere); harmless
            pass


def outcome(error: BaseException | None, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status code of a call that ended with ``error`` (None: its handler returned). The
    context is read only when the handler itself ended the call (it returned, or aborted): the
    call is alive then. A cancelled call, a closed stream (``CancelledError``, ``GeneratorExit``:
    grpc may have finished the call already) and an answer that could not be sent (``CallGone``:
    the client cancelled or its deadline passed first) are CANCELLED without touching it."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit | CallGone):
        return grpc.StatusCode.CANCELLED
    if error is None or isinstance(error, grpc.aio.AbortError):
        code = context.code()  # what the handler set: a StatusCode, or the integer it may pass
        if code is None or isinstance(code, grpc.StatusCode):
            return code or grpc.StatusCode.OK
        return _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN  # grpc answers an exception that escapes the handler with UNKNOWN


_STATUS_BY_VALUE: dict[Any, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}

