"""The Open Inference Protocol's REST binding (KServe V2 over HTTP/JSON): its routes and their
answers. An inference request's JSON (or JSON plus Triton's binary-data extension) is read into
the same ``inference.ModelInferRequest`` the V2 gRPC edge decodes, and answered by the same
``InferenceServicer.infer`` (server.oip, its pixels read by server.pixels), so both bindings refuse
the same faults with the same messages — fields named as the JSON names them (``inputs[0].data[3]``
where gRPC says ``inputs[0].contents.fp32_contents[3]``) — and run through the same data plane.
The routes go into an aiohttp router (``add_routes``); aiohttp reads their bodies, inflated and
bounded by ``client_max_size``, within --http-read-timeout (``read_body``). The listener, limits,
token, metrics and access lines are server.httpserver's."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from digitserve.inference import Model
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server.errors import InvalidInputError, ModelNotReadyError
from digitserve.server.oip import OUTPUTS, SERVER_NAME, InferenceServicer, server_version
from digitserve.server.registry import ModelInfo, Registry

logger = logging.getLogger(__name__)

JSON = "application/json"
OCTETS = "application/octet-stream"
# Triton's binary-data extension: the JSON header's length; the binary tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)
SHUTTING_DOWN = "the server is shutting down; send the request to another replica"

# A V2 datatype's typed contents field (the gRPC message's), which JSON data fills.
_CONTENTS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
    "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
# The gRPC message's field names in a domain error, as the JSON request names them.
_FIELDS = (
    (re.compile(r"^inputs\[(\d+)\]\.contents\.\w+_contents"), r"inputs[\1].data"),
    (re.compile(r"^raw_input_contents\[(\d+)\](?:\.element)?"), r"inputs[\1].binary_data"),
)


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


def rest_error(error: InvalidInputError) -> InvalidInputError:
    """The same error with the field named as the JSON request names it."""
    name = error.field
    for pattern, replacement in _FIELDS:
        name = pattern.sub(replacement, name, count=1)
    return error if name == error.field else InvalidInputError(name, error.description)


# --- the request -------------------------------------------------------------------------------

def _type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _expect(value: Any, kind: type | tuple[type, ...], field: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidInputError(field, f"{_type(value)}, expected {what}")
    return value


def _object(value: Any, field: str) -> dict[str, Any]:
    result: dict[str, Any] = _expect(value, dict, field, "an object")
    return result


def _flatten(data: list[Any]) -> list[Any]:
    """Nested arrays (row-major, as the protocol allows) as one flat list."""
    flat: list[Any] = []
    stack: list[Iterable[Any]] = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _bad_element(values: list[Any], datatype: str, field: str) -> InvalidInputError:
    """The first element of ``values`` that the datatype's contents refused, named."""
    for k, value in enumerate(values):
        where = f"{field}[{k}]"
        if datatype in ("FP32", "FP64"):
            if not isinstance(value, int | float):
                return InvalidInputError(where, f"{_type(value)}, expected a number ({datatype})")
        elif datatype == "BOOL":
            if not isinstance(value, bool):
                return InvalidInputError(where, f"{_type(value)}, expected true or false (BOOL)")
        elif not isinstance(value, int) or isinstance(value, bool):
            return InvalidInputError(where, f"{_type(value)}, expected an integer ({datatype})")
        else:
            signed = datatype.startswith("INT")
            bits = int(datatype.removeprefix("U").removeprefix("INT"))
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            if not low <= value <= high:
                return InvalidInputError(where, f"{value} does not fit {datatype}; expected {low}..{high}")
    return InvalidInputError(field, f"cannot be read as {datatype} elements")


def _bytes_elements(values: list[Any], field: str) -> list[bytes]:
    """BYTES elements in JSON: each a string holding the base64 of the bytes (an encoded picture
    is not text)."""
    out: list[bytes] = []
    for k, value in enumerate(values):
        if not isinstance(value, str):
            raise InvalidInputError(f"{field}[{k}]", f"{_type(value)}, expected a base64 string (BYTES)")
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInputError(
                f"{field}[{k}]", "not base64; in JSON a BYTES element is the base64 of its bytes "
                "(or send them with the binary data extension)") from None
    return out


def _fill(tensor: oip.ModelInferRequest.InferInputTensor, data: Any, field: str) -> None:
    """The JSON ``data`` of a tensor into its typed contents (a datatype without any, FP16 say,
    is left empty: server.pixels refuses the datatype itself)."""
    name = _CONTENTS.get(tensor.datatype)
    if name is None:
        return
    values: list[Any] = _expect(data, list, field, "an array of the tensor's elements")
    contents = getattr(tensor.contents, name)
    if tensor.datatype == "BYTES":
        contents.extend(_bytes_elements(_flatten(values), field))
        return
    try:
        contents.extend(values)
    except (TypeError, ValueError):  # nested arrays, or an element the contents refuse
        del contents[:]
        flat = _flatten(values)
        try:
            contents.extend(flat)
        except (TypeError, ValueError):
            del contents[:]
            raise _bad_element(flat, tensor.datatype, field) from None


def _parameters(value: Any, field: str, target: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """A JSON parameters object, copied (but for ``skip``) into a proto map of InferParameter, so
    that server.oip refuses the parameters it refuses over gRPC."""
    parameters = _object(value, field)
    for key, item in parameters.items():
        if key in skip:
            continue
        where = f"{field}[{key!r}]"
        if isinstance(item, bool):
            target[key].bool_param = item
        elif isinstance(item, int):
            if not -(2**63) <= item < 2**63:
                raise InvalidInputError(where, f"{item} does not fit a 64-bit integer")
            target[key].int64_param = item
        elif isinstance(item, float):
            target[key].double_param = item
        elif isinstance(item, str):
            target[key].string_param = item
        else:
            raise InvalidInputError(where, f"{_type(item)}, expected a boolean, number or string")
    return parameters


# Values a request holds besides its pixels (names, shape, outputs, parameters): room for them.
VALUE_SLACK = 4096
# A JSON body longer than this is read on a thread: the event loop runs between its steps.
THREAD_BYTES = 256 * 1024


@dataclass(frozen=True)
class ValueLimit:
    """The most values an inference request's JSON may hold: the pixels of ``images`` images of
    ``size`` elements each (the model's input, --max-images-per-request) and VALUE_SLACK more.
    Parsing costs time and memory per value, on the event loop (orjson holds the GIL even on a
    thread), and a few kilobytes of gzip can inflate to millions of values: they are counted first
    (commas, at memory speed: each value but the first of an array or object follows one)."""

    images: int
    size: int

    def check(self, body: bytes) -> None:
        most = self.images * self.size + VALUE_SLACK
        commas = body.count(b",")
        if commas >= most:
            raise InvalidInputError(
                "request body", f"up to {commas + 1:,} JSON values ({commas:,} commas), more "
                f"than the {most:,} that {self.images} images of {self.size} elements "
                "(--max-images-per-request) need; send fewer images per request, or pixels as the "
                "binary data extension")


@dataclass
class InferCall:
    """An inference request read from HTTP: the gRPC message it amounts to, and how its outputs
    are to be sent (``binary``: the names sent as binary data)."""

    request: oip.ModelInferRequest
    binary: set[str]


def read_infer(body: bytes, header_length: str | None, name: str, version: str,
               limit: ValueLimit | None = None) -> InferCall:
    """Reads an inference request body (JSON; with ``header_length``, the binary-data extension:
    that many bytes of JSON, then the binary tensors); InvalidInputError names what is wrong.
    With ``limit``, JSON that holds more values than it allows is refused before it is parsed."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise InvalidInputError(
                HEADER_LENGTH, f"{header_length[:40]!r} is not a length within the body's "
                f"{len(body)} bytes; expected the JSON header's length in bytes")
        body, binary = body[:length], body[length:]
    if limit is not None:
        limit.check(body)
    try:
        document = orjson.loads(body)  # faster than json.loads on arrays of numbers
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in exc.msg:
            raise InvalidInputError("request body", "not UTF-8 text; expected an inference request "
                                    "in JSON") from None
        raise InvalidInputError(
            "request body", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            'expected an inference request such as {"inputs": [{"name": "images", "shape": [1, 784], '
            '"datatype": "FP32", "data": [...]}]}') from None
    top = _object(document, "request body")
    request = oip.ModelInferRequest(model_name=name, model_version=version)
    if "id" in top:
        request.id = _expect(top["id"], str, "id", "a string")
    binary_output = False
    if "parameters" in top:
        parameters = _object(top["parameters"], "parameters")
        if "binary_data_output" in parameters:
            binary_output = _expect(parameters["binary_data_output"], bool,
                                    "parameters['binary_data_output']", "true or false")
    inputs = _expect(top.get("inputs"), list, "inputs", "an array of input tensors")
    offset = 0
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        tensor = _object(item, where)
        proto = request.inputs.add()
        proto.name = _expect(tensor.get("name"), str, f"{where}.name", "a string")
        proto.datatype = _expect(tensor.get("datatype"), str, f"{where}.datatype", "a string such as 'FP32'")
        shape = _expect(tensor.get("shape"), list, f"{where}.shape", "an array of integers")
        try:
            proto.shape.extend(shape)
        except (TypeError, ValueError):
            raise InvalidInputError(f"{where}.shape", f"{json.dumps(shape)[:80]} is not an array of "
                                    "64-bit integers") from None
        size: Any = None
        if "parameters" in tensor:
            parameters = _parameters(tensor["parameters"], f"{where}.parameters", proto.parameters,
                                     skip=("binary_data_size",))
            size = parameters.get("binary_data_size")
        if size is not None:
            _expect(size, int, f"{where}.parameters['binary_data_size']", "a number of bytes")
            if "data" in tensor:
                raise InvalidInputError(f"{where}.data", "set together with binary_data_size; "
                                        "expected one or the other")
            if size < 0 or offset + size > len(binary):
                raise InvalidInputError(
                    f"{where}.parameters['binary_data_size']",
                    f"{size} bytes from byte {offset} of the binary data, which holds {len(binary)}")
            request.raw_input_contents.append(binary[offset:offset + size])
            offset += size
        elif "data" not in tensor:
            raise InvalidInputError(f"{where}.data", "missing; expected the tensor's elements (or "
                                    "parameters.binary_data_size with the binary data extension)")
        elif len(inputs) == 1:  # more inputs are refused before any element is read
            _fill(proto, tensor["data"], f"{where}.data")
    if offset != len(binary):
        raise InvalidInputError(
            "request body", f"{len(binary) - offset} bytes of binary data after the inputs' "
            f"binary_data_size ({offset} bytes)")
    names: set[str] = set()
    if "outputs" in top:
        outputs = _expect(top["outputs"], list, "outputs", "an array of requested outputs")
        for i, item in enumerate(outputs):
            where = f"outputs[{i}]"
            output = _object(item, where)
            proto_output = request.outputs.add()
            proto_output.name = _expect(output.get("name"), str, f"{where}.name", "a string")
            if "parameters" in output:
                parameters = _parameters(output["parameters"], f"{where}.parameters",
                                         proto_output.parameters, skip=("binary_data",))
                wanted = parameters.get("binary_data", binary_output)
                if _expect(wanted, bool, f"{where}.parameters['binary_data']", "true or false"):
                    names.add(proto_output.name)
            elif binary_output:
                names.add(proto_output.name)
    elif binary_output:
        names = set(OUTPUTS)
    return InferCall(request, names)


# --- the answer --------------------------------------------------------------------------------

def infer_reply(model: Model, probabilities: npt.NDArray[np.float32], names: list[str],
                binary: set[str], request_id: str) -> Reply:
    """The inference response: JSON, with the outputs named in ``binary`` as binary data after it
    (the extension's framing) when there are any."""
    count, classes = probabilities.shape
    indices = np.argmax(probabilities, axis=1).astype(np.int64)
    labels = [model.spec.labels[i] for i in indices.tolist()]
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        shape = [count, classes] if name == "probabilities" else [count]
        entry: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": shape}
        if name in binary:
            if name == "probabilities":
                data = probabilities.astype("<f4").tobytes()
            elif name == "class_index":
                data = indices.astype("<i8").tobytes()
            else:
                data = b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in labels))
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif name == "probabilities":
            entry["data"] = probabilities.ravel()  # orjson writes float32 arrays itself
        elif name == "class_index":
            entry["data"] = indices
        else:
            entry["data"] = labels
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": model.spec.name, "model_version": str(model.spec.version)}
    if request_id:
        answer["id"] = request_id
    answer["outputs"] = outputs
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Reply(header + b"\n")
    return Reply(header + b"".join(chunks), content_type=OCTETS,
                 headers={HEADER_LENGTH: str(len(header))})


def _tensor_metadata(tensors: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]


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
    Route("GET", "/v2/models/{name}", "model_metadata"),
    Route("GET", "/v2/models/{name}/versions/{version}", "model_metadata"),
    Route("GET", "/v2/models/{name}/ready", "model_ready", True),
    Route("GET", "/v2/models/{name}/versions/{version}/ready", "model_ready", True),
    Route("POST", "/v2/repository/index", "repository_index"),
    Route("GET", "/metrics", "metrics", True),
)
NO_ROUTE = ("the Open Inference Protocol's routes are /v2/health/live, /v2/health/ready, /v2, "
            "/v2/models/NAME[/versions/V][/ready], POST /v2/models/NAME[/versions/V]/infer, "
            "POST /v2/repository/index and /metrics")


def add_routes(app: web.Application, api: RestApi, expect: ExpectHandler | None = None) -> None:
    """ROUTES into the app's router (a GET route answers HEAD too; ``expect`` answers their
    ``Expect`` headers); a parameter may be empty, as the protocol's paths do not forbid it."""
    for route in ROUTES:
        method: Callable[..., Any] = getattr(api, route.handler)

        async def handle(request: web.Request, method: Callable[..., Any] = method) -> web.Response:
            reply: Reply = await method(request, **request.match_info)
            return web.Response(body=reply.body, status=reply.status,
                                headers={**reply.headers, "Content-Type": reply.content_type})

        path = re.sub(r"\{(\w+)\}", r"{\1:[^/]*}", route.label)
        if route.method == "GET":
            app.router.add_get(path, handle, expect_handler=expect)
        else:
            app.router.add_route(route.method, path, handle, expect_handler=expect)


class RestApi:
    """The routes' handlers over the server's models (``router``) and the V2 servicer the gRPC
    edge serves too; ``draining()`` is true from the first moment of shutdown."""

    def __init__(self, router: Registry, servicer: InferenceServicer, draining: Callable[[], bool],
                 metrics: Callable[[], tuple[bytes, str]]) -> None:
        self._router = router
        self._servicer = servicer
        self._draining = draining
        self._metrics = metrics
        self._version = server_version()

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
        return json_reply({"name": SERVER_NAME, "version": self._version, "extensions": list(EXTENSIONS)})

    async def model_metadata(self, request: web.Request, name: str, version: str = "") -> Reply:
        response = self._servicer.model_metadata(name, version)
        return json_reply({
            "name": response.name, "versions": list(response.versions), "platform": response.platform,
            "inputs": _tensor_metadata(response.inputs), "outputs": _tensor_metadata(response.outputs),
        })

    async def model_ready(self, request: web.Request, name: str, version: str = "") -> Reply:
        """200 {"ready": true} when the model (version, label) answers; 503 while it is not
        loaded yet or the server drains; 404 for one that is not served."""
        ready = self._servicer.model_ready(name, version) and not self._draining()
        answer = {"name": name, "ready": ready}
        if version:
            answer["version"] = version
        return json_reply(answer, 200 if ready else 503)

    async def infer(self, request: web.Request, name: str, version: str = "") -> Reply:
        if self._draining():
            raise ModelNotReadyError(SHUTTING_DOWN)
        plane, model = self._servicer.resolve(name, version, "model_version")
        limit = ValueLimit(plane.max_images_per_request, model.spec.input_size)
        data = await read_body(request)
        read = partial(read_infer, data, request.headers.get(HEADER_LENGTH), name, version, limit)
        try:
            call = await asyncio.to_thread(read) if len(data) > THREAD_BYTES else read()
            model, probabilities, names, _ = await self._servicer.infer(call.request, None)
        except InvalidInputError as error:
            raise rest_error(error) from None
        return infer_reply(model, probabilities, names, call.binary, call.request.id)

    async def repository_index(self, request: web.Request) -> Reply:
        data = await read_body(request)
        ready_only = False
        if data.strip():
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise InvalidInputError("request body", 'not valid JSON; expected {"ready": true} '
                                        "or {} or nothing") from None
            ready_only = _expect(_object(document, "request body").get("ready", False), bool,
                                 "ready", "true or false")
        return json_reply(repository_index(self._router.model_infos(), ready_only))

    async def metrics(self, request: web.Request) -> Reply:
        text, content_type = self._metrics()
        return Reply(text, content_type=content_type)
