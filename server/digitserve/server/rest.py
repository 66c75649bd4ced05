"""The Open Inference Protocol's REST binding (KServe V2 over HTTP/JSON): its routes and their
answers. An inference request's JSON (or JSON plus Triton's binary-data extension) is read by
server.restcodec into the neutral request every edge converts to, and answered by server.infer,
so both bindings refuse the same faults with the same messages — fields named as the JSON names
them (``inputs[0].data[3]`` where gRPC says ``inputs[0].contents.fp32_contents[3]``) — and run
through the same data plane. The HTTP plumbing (listener, limits, token, metrics, access lines)
is server.httpserver's."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson

from digitserve.server import infer
from digitserve.server.errors import InvalidInputError, ModelNotReadyError
from digitserve.server.models import ModelInfo, Router
from digitserve.server.restcodec import (
    HEADER_LENGTH,
    THREAD_BYTES,
    ValueLimit,
    expect,
    infer_body,
    read_infer,
)

logger = logging.getLogger(__name__)

JSON = "application/json"
OCTETS = "application/octet-stream"
EXTENSIONS = ("binary_tensor_data",)
SHUTTING_DOWN = "the server is shutting down; send the request to another replica"

@dataclass
class Reply:
    """What a route answers: status, body, content type and extra headers."""

    body: bytes
    status: int = 200
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(value: Any, status: int = 200) -> Reply:
    """``value`` as JSON, one line (ended, so that curl's output ends with it)."""
    return Reply(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE), status)


def error_reply(status: int, message: str, **extra: Any) -> Reply:
    """``{"error": "..."}`` (and ``extra`` keys) with ``status``."""
    return json_reply({**extra, "error": message}, status)


_INDEX_STATES = {"serving": "READY", "refused": "UNAVAILABLE"}


def repository_index(infos: Iterable[ModelInfo], ready_only: bool) -> list[dict[str, Any]]:
    """Triton's repository index: one entry per model version (a model without versions, one
    entry), with its state (READY, LOADING, UNAVAILABLE), why, and its version labels."""
    entries: list[dict[str, Any]] = []
    for info in infos:
        if not info.versions:
            entries.append({"name": info.name, "state": "UNAVAILABLE", "reason": info.reason})
        for version in info.versions:
            state = _INDEX_STATES.get(version.state) or ("LOADING" if info.state == "loading"
                                                        else "UNAVAILABLE")
            entry: dict[str, Any] = {"name": info.name, "version": str(version.version),
                                     "state": state, "reason": version.reason}
            if version.labels:
                entry["labels"] = list(version.labels)
            entries.append(entry)
    return [e for e in entries if e["state"] == "READY"] if ready_only else entries


# --- the routes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """A route: its method, path pattern, the handler's name on RestApi, its label in metrics,
    and whether it needs the bearer token (health and metrics do not, as gRPC health does not)."""

    method: str
    pattern: re.Pattern[str]
    handler: str
    label: str
    open: bool = False


def _route(method: str, path: str, handler: str, open_: bool = False) -> Route:
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]*)", path)
    return Route(method, re.compile(regex + "$"), handler, path, open_)


ROUTES = (
    _route("GET", "/v2/health/live", "live", True),
    _route("GET", "/v2/health/ready", "ready", True),
    _route("GET", "/v2", "server_metadata"),
    _route("GET", "/v2/models/{name}", "model_metadata"),
    _route("GET", "/v2/models/{name}/versions/{version}", "model_metadata"),
    _route("GET", "/v2/models/{name}/ready", "model_ready", True),
    _route("GET", "/v2/models/{name}/versions/{version}/ready", "model_ready", True),
    _route("POST", "/v2/models/{name}/infer", "infer"),
    _route("POST", "/v2/models/{name}/versions/{version}/infer", "infer"),
    _route("POST", "/v2/repository/index", "repository_index"),
    _route("GET", "/metrics", "metrics", True),
)


class NoRoute(Exception):
    """No route for the path (404), or none for the method (405; ``allowed`` lists those)."""

    def __init__(self, message: str, status: int, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.allowed = allowed


def match(method: str, path: str) -> tuple[Route, dict[str, str]]:
    """The route of ``method path`` and its parameters; NoRoute otherwise. HEAD is GET without
    the body."""
    wanted = "GET" if method == "HEAD" else method
    allowed: list[str] = []
    for route in ROUTES:
        found = route.pattern.match(path)
        if found is None:
            continue
        if route.method == wanted:
            return route, found.groupdict()
        allowed.append(route.method)
    if allowed:
        methods = tuple(sorted(set(allowed)))
        raise NoRoute(f"{method} is not allowed on {path[:200]}; use {' or '.join(methods)}", 405, methods)
    raise NoRoute(f"no route {method} {path[:200]}; the Open Inference Protocol's routes are "
                  "/v2/health/live, /v2/health/ready, /v2, /v2/models/NAME[/versions/V][/ready], "
                  "POST /v2/models/NAME[/versions/V]/infer, POST /v2/repository/index and /metrics", 404)


class RestApi:
    """The routes' handlers over the server's models (``router``); ``draining()`` is true from
    the first moment of shutdown."""

    def __init__(self, router: Router, draining: Callable[[], bool],
                 metrics: Callable[[], tuple[bytes, str]]) -> None:
        self._router = router
        self._draining = draining
        self._metrics = metrics
        self._version = infer.server_version()

    @property
    def draining(self) -> bool:
        """True from the first moment of the server's stop."""
        return self._draining()

    def handler(self, route: Route) -> Callable[..., Awaitable[Reply]]:
        method: Callable[..., Awaitable[Reply]] = getattr(self, route.handler)
        return method

    async def live(self, body: Callable[[], Awaitable[bytes]], headers: Mapping[str, str]) -> Reply:
        return json_reply({"live": True})

    async def ready(self, body: Callable[[], Awaitable[bytes]], headers: Mapping[str, str]) -> Reply:
        """200 while the server serves (its default model, or with none, a model: health "");
        503 before the first version is loaded and warmed, and from the first moment of a drain."""
        if self._draining():
            return error_reply(503, SHUTTING_DOWN, ready=False)
        if not self._router.ready:
            infos = self._router.model_infos()
            why = "; ".join(f"model {i.name}: {i.reason or i.state}" for i in infos) or "no model yet"
            return error_reply(503, f"not ready: {why}", ready=False)
        return json_reply({"ready": True})

    async def server_metadata(self, body: Callable[[], Awaitable[bytes]],
                              headers: Mapping[str, str]) -> Reply:
        return json_reply({"name": infer.SERVER_NAME, "version": self._version,
                           "extensions": list(EXTENSIONS)})

    async def model_metadata(self, body: Callable[[], Awaitable[bytes]], headers: Mapping[str, str],
                             name: str, version: str = "") -> Reply:
        return json_reply(infer.model_metadata(self._router, name, version))

    async def model_ready(self, body: Callable[[], Awaitable[bytes]], headers: Mapping[str, str],
                          name: str, version: str = "") -> Reply:
        """200 {"ready": true} when the model (version, label) answers; 503 while it is not
        loaded yet or the server drains; 404 for one that is not served."""
        ready = infer.model_ready(self._router, name, version) and not self._draining()
        answer = {"name": name, "ready": ready}
        if version:
            answer["version"] = version
        return json_reply(answer, 200 if ready else 503)

    async def infer(self, body: Callable[[], Awaitable[bytes]], headers: Mapping[str, str],
                    name: str, version: str = "") -> Reply:
        if self._draining():
            raise ModelNotReadyError(SHUTTING_DOWN)
        plane, model = infer.resolve(self._router, name, version, "model_version", split=True)
        limit = ValueLimit(plane.max_images_per_request, model.spec.input_size)
        data = await body()
        read = partial(read_infer, data, headers.get(HEADER_LENGTH), name, limit)
        call = await asyncio.to_thread(read) if len(data) > THREAD_BYTES else read()
        response = await infer.infer(plane, model, call.request, self._router.pictures, None)
        answer, length = infer_body(response, call.binary)
        if length is None:
            return Reply(answer)
        return Reply(answer, content_type=OCTETS, headers={HEADER_LENGTH: str(length)})

    async def repository_index(self, body: Callable[[], Awaitable[bytes]],
                               headers: Mapping[str, str]) -> Reply:
        data = await body()
        ready_only = False
        if data.strip():
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise InvalidInputError("request body", 'not valid JSON; expected {"ready": true} '
                                        "or {} or nothing") from None
            ready_only = expect(expect(document, dict, "request body", "an object").get("ready", False), bool,
                                 "ready", "true or false")
        return json_reply(repository_index(self._router.model_infos(), ready_only))

    async def metrics(self, body: Callable[[], Awaitable[bytes]], headers: Mapping[str, str]) -> Reply:
        text, content_type = self._metrics()
        return Reply(text, content_type=content_type)
