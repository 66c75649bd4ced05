"""The Open Inference Protocol's REST binding (KServe V2 over HTTP/JSON): its routes and their
answers. An inference request's JSON (or JSON plus Triton's binary-data extension) is read by
server.restcodec into the neutral request every edge converts to, and answered by server.infer,
so both bindings refuse the same faults with the same messages — fields named as the JSON names
them (``inputs[0].data[3]`` where gRPC says ``inputs[0].contents.fp32_contents[3]``) — and run
through the same data plane.
The routes go into an aiohttp router (``add_routes``); aiohttp reads their bodies, inflated and
bounded by ``client_max_size``, within --http-read-timeout (``read_body``). The listener, limits,
token, metrics and access lines are server.httpserver's."""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from digitserve.inference import Model
from digitserve.server import infer, tfservingcodec
from digitserve.server.dataplane import DataPlane
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import InvalidInputError, ModelNotReadyError, NotServedError
from digitserve.server.modelcontrol import ModelControl, repository_index
from digitserve.server.registry import Registry
from digitserve.server.restcodec import (
    HEADER_LENGTH,
    THREAD_BYTES,
    ValueLimit,
    expect,
    infer_body,
    read_infer,
)
from digitserve.server.tritonconfig import EXTENSIONS, model_config

logger = logging.getLogger(__name__)

JSON = "application/json"
OCTETS = "application/octet-stream"
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


# --- the body ----------------------------------------------------------------------------------

ExpectHandler = Callable[[web.Request], Awaitable[None]]
READ_TIMEOUT = web.AppKey("read_timeout", float)  # --http-read-timeout, for a request's body
_ENCODINGS = ("gzip", "deflate", "x-gzip", "identity", "")


def too_large(size: str, limit: int) -> web.HTTPException:
    return web.HTTPRequestEntityTooLarge(
        limit, 0, text=f"request body: {size} bytes exceed the limit of {limit:,} (--max-message-"
        "bytes); send fewer images per request, or pixels as the binary data extension")


def unsupported(encoding: str) -> web.HTTPException:
    return web.HTTPUnsupportedMediaType(text=f"Content-Encoding {encoding[:40]!r} is not supported;"
                                        " send the body as is, or gzip or deflate it")


async def read_body(request: web.Request) -> bytes:
    """The request's body, read within --http-read-timeout, at most --max-message-bytes (the
    app's ``client_max_size``; aiohttp inflates gzip and deflate as they arrive, no further than
    that); an HTTPException says why not. ConnectionError: the client left before it was in."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in _ENCODINGS:
        raise unsupported(encoding)
    timeout, limit = request.app[READ_TIMEOUT], request.client_max_size
    try:
        async with asyncio.timeout(timeout):
            data = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"request body: not received within {timeout:g}s (--http-"
                                     f"read-timeout; {request.content.total_bytes:,} bytes came)") from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(f"{'inflated to ' if encoding not in ('identity', '') else ''}more than "
                        f"{limit:,}", limit) from None
    except RequestPayloadError as exc:  # data gzip or deflate cannot read
        request.content.feed_eof()  # nothing more to read (aiohttp would try, and log the error)
        cause = exc.__cause__.__context__ if exc.__cause__ else None
        raise web.HTTPBadRequest(text=f"request body: not valid {encoding} data"
                                 + (f" ({cause})" if isinstance(cause, zlib.error) else "")) from None
    if encoding == "x-gzip":  # gzip by its old name, which aiohttp leaves as it is
        inflater = zlib.decompressobj(31)
        try:
            data = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise web.HTTPBadRequest(text=f"request body: not valid x-gzip data ({exc})") from None
        if len(data) > limit or inflater.unconsumed_tail:
            raise too_large(f"inflated to more than {limit:,}", limit)
    return data


# --- the routes --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """A route: its method, path (``{name}`` a parameter; the route's label in metrics), the
    handler's name on RestApi, and whether it needs the bearer token (health and metrics do not,
    as gRPC health does not)."""

    method: str
    label: str
    handler: str
    open: bool = False


ROUTES = (  # the router tries the paths of /v2/models in this order: inference first
    Route("POST", "/v2/models/{name}/infer", "infer"),
    Route("POST", "/v2/models/{name}/versions/{version}/infer", "infer"),
    Route("GET", "/v2/health/live", "live", True),
    Route("GET", "/v2/health/ready", "ready", True),
    Route("GET", "/v2", "server_metadata"),
    Route("GET", "/v2/", "server_metadata"),  # the protocol's OpenAPI spells it so
    Route("GET", "/v2/models/stats", "statistics"),
    Route("GET", "/v2/models/{name}/stats", "statistics"),
    Route("GET", "/v2/models/{name}/versions/{version}/stats", "statistics"),
    Route("GET", "/v2/models/{name}", "model_metadata"),
    Route("GET", "/v2/models/{name}/versions/{version}", "model_metadata"),
    Route("GET", "/v2/models/{name}/ready", "model_ready", True),
    Route("GET", "/v2/models/{name}/versions/{version}/ready", "model_ready", True),
    Route("GET", "/v2/models/{name}/config", "model_config"),
    Route("GET", "/v2/models/{name}/versions/{version}/config", "model_config"),
    # TF Serving's REST API (KServe's V1 protocol): server.tfservingcodec
    Route("POST", "/v1/models/{name}:predict", "predict"),
    Route("POST", "/v1/models/{name}/versions/{version}:predict", "predict"),
    Route("POST", "/v1/models/{name}/labels/{label}:predict", "predict"),
    Route("GET", "/v1/models/{name}", "v1_status"),
    Route("GET", "/v1/models/{name}/versions/{version}", "v1_status"),
    Route("GET", "/v1/models/{name}/labels/{label}", "v1_status"),
    Route("GET", "/v1/models/{name}/metadata", "v1_metadata"),
    Route("GET", "/v1/models/{name}/versions/{version}/metadata", "v1_metadata"),
    Route("GET", "/v1/models/{name}/labels/{label}/metadata", "v1_metadata"),
    Route("POST", "/v2/repository/index", "repository_index"),
    Route("POST", "/v2/repository/models/{name}/load", "load"),
    Route("POST", "/v2/repository/models/{name}/unload", "unload"),
    Route("GET", "/metrics", "metrics", True),
)
NO_ROUTE = ("the Open Inference Protocol's routes are /v2/health/live, /v2/health/ready, /v2, "
            "/v2/models/NAME[/versions/V][/ready|/config], /v2/models[/NAME[/versions/V]]/stats, "
            "POST /v2/models/NAME[/versions/V]/infer, POST /v2/repository/index, "
            "POST /v2/repository/models/NAME/load and /unload, and /metrics; TF Serving's are "
            "/v1/models/NAME[/versions/V|/labels/L][/metadata] and POST "
            "/v1/models/NAME[/versions/V|/labels/L]:predict")


def add_routes(app: web.Application, api: RestApi, expect: ExpectHandler | None = None) -> None:
    """ROUTES into the app's router (a GET route answers HEAD too; ``expect`` answers their
    ``Expect`` headers); a parameter may be empty, as the protocol's paths do not forbid it."""
    for route in ROUTES:
        method: Callable[..., Any] = getattr(api, route.handler)

        async def handle(request: web.Request, method: Callable[..., Any] = method) -> web.Response:
            reply: Reply = await method(request, **request.match_info)
            return web.Response(body=reply.body, status=reply.status,
                                headers={**reply.headers, "Content-Type": reply.content_type})

        # TF Serving's names end before ':predict'
        part = "[^/:]*" if route.label.startswith("/v1/") else "[^/]*"
        path = re.sub(r"\{(\w+)\}", f"{{\\1:{part}}}", route.label)
        if route.method == "GET":
            app.router.add_get(path, handle, expect_handler=expect)
        else:
            app.router.add_route(route.method, path, handle, expect_handler=expect)


class RestApi:
    """The routes' handlers over the server's models (``router``) and the V2 servicer the gRPC
    edge serves too; ``draining()`` is true from the first moment of shutdown."""

    def __init__(self, router: Registry, pictures: PictureDecoder, draining: Callable[[], bool],
                 metrics: Callable[[str, Mapping[str, str]], tuple[bytes, dict[str, str]]],
                 instances: int = 1, control: ModelControl | None = None) -> None:
        self._router = router
        self._instances = instances  # the model's copies at this address (--workers)
        self._control = control if control is not None else ModelControl("none", router, None)
        self._pictures = pictures
        self._draining = draining
        self._metrics = metrics
        self._version = infer.server_version()

    @property
    def draining(self) -> bool:
        """True from the first moment of the server's stop."""
        return self._draining()

    async def live(self, request: web.Request) -> Reply:
        return json_reply({"live": True})

    async def ready(self, request: web.Request) -> Reply:
        """200 while the server serves (its default model, or with none, a model: health "");
        503 before the first version is loaded and warmed, and from the first moment of a drain."""
        if self._draining():
            return error_reply(503, SHUTTING_DOWN, ready=False)
        if not self._router.ready:
            infos = self._router.model_infos()
            why = "; ".join(f"model {i.name}: {i.reason or i.state}" for i in infos) or "no model yet"
            return error_reply(503, f"not ready: {why}", ready=False)
        return json_reply({"ready": True})

    async def server_metadata(self, request: web.Request) -> Reply:
        return json_reply({"name": infer.SERVER_NAME, "version": self._version,
                           "extensions": list(EXTENSIONS)})

    async def model_metadata(self, request: web.Request, name: str, version: str = "") -> Reply:
        return json_reply(infer.model_metadata(self._router, name, version))

    async def model_config(self, request: web.Request, name: str, version: str = "") -> Reply:
        return json_reply(model_config(self._router, name, version, self._instances))

    async def model_ready(self, request: web.Request, name: str, version: str = "") -> Reply:
        """200 {"ready": true} when the model (version, label) answers; 503 while it is not
        loaded yet or the server drains; 404 with ``"ready": false`` and why for one that is not
        served (ModelReady over gRPC: ready false)."""
        answer: dict[str, Any] = {"name": name}
        if version:
            answer["version"] = version
        try:
            ready = infer.model_ready(self._router, name, version) and not self._draining()
        except NotServedError as error:
            return json_reply({**answer, "ready": False, "error": str(error)}, 404)
        return json_reply({**answer, "ready": ready}, 200 if ready else 503)

    async def infer(self, request: web.Request, name: str, version: str = "") -> Reply:
        if self._draining():
            raise ModelNotReadyError(SHUTTING_DOWN)
        plane, model = infer.resolve(self._router, name, version, "model_version", split=True)
        limit = ValueLimit(plane.max_images_per_request, model.spec.input_size)
        data = await read_body(request)
        read = partial(read_infer, data, request.headers.get(HEADER_LENGTH), name, limit)
        call = await asyncio.to_thread(read) if len(data) > THREAD_BYTES else read()
        response = await infer.infer(plane, model, call.request, self._pictures, None)
        answer, length = infer_body(response, call.binary)
        response.answered()
        if length is None:
            return Reply(answer)
        return Reply(answer, content_type=OCTETS, headers={HEADER_LENGTH: str(length)})

    def _v1_model(self, name: str, version: str, label: str, split: bool = False
                  ) -> tuple[DataPlane, Model]:
        """TF Serving's (name, version or label) resolved as the V2 routes resolve theirs."""
        if version and not version.isdecimal():
            raise InvalidInputError("version", f"{version[:80]!r} is not a version number; name a "
                                    "label as /labels/LABEL")
        if label and label.isdecimal():
            raise InvalidInputError("label", f"{label!r} is not a version label; name a version "
                                    "number as /versions/VERSION")
        return infer.resolve(self._router, name, version or label, "version", split=split)

    async def predict(self, request: web.Request, name: str, version: str = "",
                      label: str = "") -> Reply:
        """TF Serving's predict: ``instances`` or ``inputs`` in, ``predictions`` or
        ``outputs`` out, through the data plane the V2 route uses."""
        if self._draining():
            raise ModelNotReadyError(SHUTTING_DOWN)
        plane, model = self._v1_model(name, version, label, split=not (version or label))
        data = await read_body(request)
        ValueLimit(plane.max_images_per_request, model.spec.input_size).check(data)
        read = partial(tfservingcodec.read_predict, data, name)
        call = await asyncio.to_thread(read) if len(data) > THREAD_BYTES else read()
        response = await infer.infer(plane, model, call.request, self._pictures, None)
        answer = tfservingcodec.predict_body(response, call.rows)
        response.answered()
        return json_reply(answer)

    async def v1_status(self, request: web.Request, name: str, version: str = "",
                        label: str = "") -> Reply:
        """TF Serving's model status: each version of the model (or the one named) and its state."""
        self._router.model(name)  # NotServedError for a model not served
        number = int(version) if version.isdecimal() else 0
        if label or (version and not number):
            number = self._v1_model(name, version, label)[1].spec.version
        index = repository_index(self._router.model_infos(), False)
        return json_reply(tfservingcodec.model_status(index, name, number))

    async def v1_metadata(self, request: web.Request, name: str, version: str = "",
                          label: str = "") -> Reply:
        spec = self._v1_model(name, version, label)[1].spec
        return json_reply(tfservingcodec.model_metadata(spec.name, spec.version, spec.input_size,
                                                        len(spec.labels)))

    async def _options(self, request: web.Request, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
        """A repository request's JSON body (none, or an object): its "parameters", of which only
        ``allowed`` are accepted (Triton's others override a model's config or files)."""
        data = await read_body(request)
        if not data.strip():
            return {}
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise InvalidInputError("request body", 'not valid JSON; expected {"ready": true} '
                                    "or {} or nothing" if request.path.endswith("/index") else
                                    "not valid JSON; expected an object or nothing") from None
        document = expect(document, dict, "request body", "an object")
        parameters = expect(document.get("parameters", {}), dict, "parameters", "an object")
        for key in parameters:
            if key not in allowed:
                raise InvalidInputError(f"parameters[{key!r}]", "is not supported by this server")
        return dict(document)

    async def repository_index(self, request: web.Request) -> Reply:
        document = await self._options(request)
        ready_only = expect(document.get("ready", False), bool, "ready", "true or false")
        return json_reply(repository_index(self._router.model_infos(), ready_only))

    async def statistics(self, request: web.Request, name: str = "", version: str = "") -> Reply:
        return json_reply(infer.model_statistics(self._router, name, version))

    async def load(self, request: web.Request, name: str) -> Reply:
        await self._options(request)
        await self._control.load(name)
        return json_reply({})

    async def unload(self, request: web.Request, name: str) -> Reply:
        await self._options(request, ("unload_dependents",))
        await self._control.unload(name)
        return json_reply({})

    async def metrics(self, request: web.Request) -> Reply:
        """The metrics as the metrics port answers them (its format and compression negotiated
        from ``Accept`` and ``Accept-Encoding``)."""
        body, headers = self._metrics(request.query_string, request.headers)
        content_type = headers.pop("Content-Type")
        return Reply(body, content_type=content_type, headers=headers)
