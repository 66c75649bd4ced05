"""What every call goes through before and after its method: a request id, the bearer-token check,
metrics and the access line. Applied once per method when services are registered (Services
stands in for the server then), not by a grpc.aio interceptor, which costs an extra coroutine, a
handler lookup and a new handler object on every call (about a fifth of a Predict's CPU here)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from digitserve.server.drain import REFUSED, Drain
from digitserve.server.security import TokenAuth
from digitserve.server.telemetry import Call, CallGone, MethodMetrics, Telemetry, outcome, request_id_of

logger = logging.getLogger(__name__)

# (grpc_type label, RpcMethodHandler attribute, handler constructor)
_KINDS = (
    ("unary", "unary_unary", grpc.unary_unary_rpc_method_handler),
    ("client_stream", "stream_unary", grpc.stream_unary_rpc_method_handler),
    ("server_stream", "unary_stream", grpc.unary_stream_rpc_method_handler),
    ("bidi_stream", "stream_stream", grpc.stream_stream_rpc_method_handler),
)


class CallWrapper:
    """Wraps method handlers: each call gets a request id (the caller's ``x-request-id`` or a new
    one, echoed in the trailing metadata and put on every log record made while serving it), is
    refused UNAUTHENTICATED without an accepted token (when ``auth`` is set; health stays open),
    and is counted, timed and logged whatever its outcome. Every behavior is wrapped, synchronous
    ones too (they then run in a thread, as grpc.aio would run them): none escapes the token
    check (tests/server/test_auth_coverage.py). Once ``drain`` has started, a call that arrives
    is held, then refused UNAVAILABLE (digitserve.server.drain); health checks are not held."""

    def __init__(self, telemetry: Telemetry, auth: TokenAuth | None = None,
                 drain: Drain | None = None) -> None:
        self._telemetry = telemetry
        self._auth = auth
        self._drain = drain

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for kind, attribute, make in _KINDS:
            behavior = getattr(handler, attribute)
            if behavior is None:
                continue
            auth = self._auth if self._auth is not None and not self._auth.is_open(method) else None
            drain = None if method.startswith(_HEALTH) else self._drain
            wrapped = _wrap(behavior, MethodMetrics(self._telemetry, kind, method), auth,
                            (handler.request_streaming, handler.response_streaming), drain)
            return make(
                wrapped,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


_HEALTH = "/grpc.health.v1.Health/"


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], method: str, problem: str) -> None:
    logger.info("unauthenticated call to %s from %s: %s", method, context.peer(), problem)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)


def _wrap(
    behavior: Callable[..., Any], metrics: MethodMetrics, auth: TokenAuth | None,
    streaming: tuple[bool, bool] = (False, False), drain: Drain | None = None,
) -> Callable[..., Any]:
    """The behavior inside a Call, keeping its flavour (coroutine or async generator), which
    grpc.aio inspects to decide how to run it. A synchronous behavior becomes one of those too,
    run in a thread as grpc.aio itself would run it, so that it is observed and needs the token
    like every other."""
    method = metrics.method
    if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
        behavior = _threaded(behavior, *streaming)
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            metadata = context.invocation_metadata()
            call = Call(metrics, request_id_of(metadata), context)
            try:
                if auth is not None and (problem := auth.check(metadata)) is not None:
                    await _refuse(context, method, problem)
                if drain is not None and drain.started:
                    await drain.hold()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                # GeneratorExit: the stream was closed, maybe long after grpc ended the call
                # (an abandoned stream, collected later): outcome() does not touch the context.
                call.finish(outcome(exc, context))
                raise
            call.finish(outcome(None, context))

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        metadata = context.invocation_metadata()
        call = Call(metrics, request_id_of(metadata), context)
        try:
            if auth is not None and (problem := auth.check(metadata)) is not None:
                await _refuse(context, method, problem)
            if drain is not None and drain.started:
                await drain.hold()
                await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
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
        call.finish(outcome(None, context))
        return response

    return unary


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


class _WrappingGenericHandler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """A generic handler whose service the server does not register by name: wraps what it
    returns, once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: CallWrapper) -> None:
        self._inner = inner
        self._wrapper = wrapper
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = self._inner.service(handler_call_details)
            self._wrapped[method] = None if handler is None else self._wrapper.wrap(method, handler)
        return self._wrapped[method]


class Services:
    """Stands in for the grpc.aio.Server while services are added (by the generated
    ``add_*Servicer_to_server`` functions, health, reflection, servicer.add_to_server): each method
    handler is wrapped once, then handed to the server. Call ``close()`` when all are added."""

    def __init__(self, server: grpc.aio.Server, wrapper: CallWrapper) -> None:
        self._server = server
        self._wrapper = wrapper
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: set[str] = set()

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        # Added as a generic handler only, as the null server's are: grpc.aio's registered-method
        # lookup cost a little more CPU per call in paired runs here.
        wrapped = {name: self._wrapper.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),))
        self._registered.add(service)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        # Kept until close(): generated code adds the generic handler of a service just before
        # its registered methods, which replace it.
        self._generic.extend(handlers)

    def close(self) -> None:
        kept: Sequence[grpc.GenericRpcHandler] = [
            h for h in self._generic
            if not (isinstance(h, grpc.ServiceRpcHandler) and h.service_name() in self._registered)
        ]
        if kept:
            self._server.add_generic_rpc_handlers(
                tuple(_WrappingGenericHandler(h, self._wrapper) for h in kept))
        self._generic.clear()
