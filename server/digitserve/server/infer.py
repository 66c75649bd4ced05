"""The one inference path of every edge: a neutral request (server.infertypes) checked, its pixels
read (server.pixels) and admitted, the data plane's answer returned as a neutral response; and the
V2 protocol's model addressing (a version as text: an integer, a label or "") and metadata, which
both of its bindings (server.oip over gRPC, server.rest over HTTP) serve."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from functools import partial
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import numpy.typing as npt

from digitserve.inference import Model
from digitserve.server.dataplane import DataPlane
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import InvalidInputError, ModelNotReadyError, NotServedError
from digitserve.server.infertypes import (
    INPUT_DATATYPE,
    INPUT_NAME,
    OUTPUTS,
    InferInput,
    InferRequest,
    InferResponse,
)
from digitserve.server.pixels import (
    PICTURES,
    check_count,
    check_picture_sizes,
    decode_pictures,
    tensor_count,
    tensor_pictures,
    tensor_pixels,
)
from digitserve.server.registry import Registry
from digitserve.server.statistics import report

SERVER_NAME = "digitserve"
# Triton features this server does not implement; refused rather than silently ignored.
_UNSUPPORTED_PARAMETER = re.compile(r"classification|shared_memory_.*")
_VERSION = re.compile(r"[0-9]+")
_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
ALL_OUTPUTS = tuple(OUTPUTS)


def server_version() -> str:
    try:
        return importlib_metadata.version("digitserve")
    except importlib_metadata.PackageNotFoundError:  # run from a checkout without installing
        return "0+unknown"


def resolve(router: Registry, name: str, version: str, field: str,
            split: bool = False) -> tuple[DataPlane, Model]:
    """The V2 protocol's (name, version): the data plane and the model that answer for it
    (``split``: an unpinned inference call, which the canary weight may send to the canary).
    The protocol names the model in every request; ``version`` is ours as text, a version label
    or "" (the default), and ``field`` names it in errors."""
    if not name:
        names = ", ".join(repr(info.name) for info in router.model_infos()) or "no model yet"
        raise NotServedError(f"model '' is not served; this server serves {names}")
    versions = router.model(name)
    if version == "":
        return versions.plane, versions.resolve(0, split=split)
    if _LABEL.fullmatch(version):
        return versions.plane, versions.resolve(0, version)
    if not _VERSION.fullmatch(version):
        raise InvalidInputError(field, f"{version!r} is not a version; expected an integer such as "
                                "'1', a version label such as 'stable', or ''")
    if int(version) < 1:
        raise NotServedError(f"model {name!r} version {version} is not served")
    return versions.plane, versions.resolve(int(version))


def model_ready(router: Registry, name: str, version: str) -> bool:
    """Whether (name, version) answers now; NotServedError / InvalidInputError as resolve (the
    edges answer NotServedError as not ready, as Triton does: docs/interoperability.md)."""
    try:
        resolve(router, name, version, "version")
    except ModelNotReadyError:
        return False
    return True


# The V2 platform ("<project>_<format>") of each inference path: what runs the model. The protocol's
# list has neither a LiteRT flatbuffer nor a Keras archive (docs/interoperability.md, "Platform").
PLATFORMS = {"litert": "litert_tflite", "tensorflow": "tensorflow_keras"}


def platform(model: Model) -> str:
    """The V2 platform of the path that runs ``model`` (its inference path's name for another)."""
    return PLATFORMS.get(model.inference_path, model.inference_path)


def model_metadata(router: Registry, name: str, version: str) -> dict[str, Any]:
    """The V2 protocol's model metadata of (name, version), as its JSON spells it."""
    _, model = resolve(router, name, version, "version")
    spec = model.spec
    return {
        "name": spec.name, "versions": [str(v) for v in router.model(name).loaded_versions],
        "platform": platform(model),
        "inputs": [{"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, spec.input_size]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(spec.labels)]},
                    {"name": "class_index", "datatype": "INT64", "shape": [-1]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }


def model_statistics(router: Registry, name: str, version: str) -> dict[str, Any]:
    """Triton's statistics of (name, version) as its JSON spells them: every model served when
    ``name`` is "", every loaded version of the model when ``version`` is "", else the version
    (a number or a label) as inference would resolve it."""
    if version and not name:
        raise InvalidInputError("version", f"{version!r} set without a model name; name the model")
    if version:
        plane, model = resolve(router, name, version, "version")
        return report([(name, model.spec.version, plane.statistics)])
    models = [router.model(name)] if name else [router.models[n] for n in sorted(router.models)]
    return report([(m.name, v, m.plane.statistics) for m in models for v in sorted(m.loaded_versions)])


def _check_parameters(parameters: Iterable[str], field: str) -> None:
    """Refuses parameters asking for Triton features this server lacks."""
    for key in parameters:
        if _UNSUPPORTED_PARAMETER.fullmatch(key):
            raise InvalidInputError(f"{field}[{key!r}]", "is not supported by this server")


def requested_outputs(request: InferRequest, model: Model) -> Sequence[str]:
    """Names of the outputs to return, in request order."""
    names: list[str] = []
    for i, output in enumerate(request.outputs):
        if output.name not in OUTPUTS:
            raise InvalidInputError(
                f"outputs[{i}].name", f"{output.name!r} is not an output of model "
                f"{model.spec.name!r}; expected one of {list(OUTPUTS)}")
        _check_parameters(output.parameters, f"outputs[{i}].parameters")
        if output.name not in names:
            names.append(output.name)
    return names


def read(plane: DataPlane, model: Model, tensor: InferInput) -> tuple[int, npt.NDArray[np.float32] | None]:
    """The input's number of images and, unless they are pictures (then None: ``decode``), its
    pixels as float32 (N, input_size) in [0, 1], admitted by the model's queue before any pixel
    is converted."""
    spec = model.spec
    count = tensor_count(tensor, spec.input_shape)
    check_count(count, plane.max_images_per_request, tensor.where.count)
    if tensor.datatype == PICTURES or tensor.pictures:
        return count, None
    plane.admit(model, count)
    return count, tensor_pixels(tensor, count, spec.input_size)


async def decode(plane: DataPlane, model: Model, tensor: InferInput, count: int,
                 decoder: PictureDecoder, until: float | None) -> npt.NDArray[np.float32]:
    """The pixels of an input holding pictures, decoded on ``decoder``'s threads (admitted there
    and by the model's queue first)."""
    spec = model.spec
    items = tensor_pictures(tensor, count)
    check_picture_sizes(items, decoder.limits, tensor.where.tensor)
    decoder.admit(len(items))
    plane.admit(model, count)
    return await decoder.run(len(items), partial(
        decode_pictures, tensor, items, count, spec.input_size, spec.input_shape, decoder.limits,
        until))


async def pixels(plane: DataPlane, model: Model, tensor: InferInput, decoder: PictureDecoder,
                 until: float | None = None) -> npt.NDArray[np.float32]:
    """The input's images as float32 (N, input_size) in [0, 1] (read, or decode its pictures)."""
    count, images = read(plane, model, tensor)
    return images if images is not None else await decode(plane, model, tensor, count, decoder, until)


async def infer(plane: DataPlane, model: Model, request: InferRequest, decoder: PictureDecoder,
                until: float | None = None) -> InferResponse:
    """One inference call of any edge on ``model`` (which the edge resolved): the outputs asked
    for, the one input (named INPUT_NAME, no parameter refused) read and predicted. Counted in
    the version's statistics: failed here, answered by the edge once it built the answer
    (InferResponse.answered)."""
    started = time.perf_counter_ns()
    statistics = plane.statistics.of(model)
    try:
        names = requested_outputs(request, model) if request.outputs else ALL_OUTPUTS
        if len(request.inputs) != 1:
            raise InvalidInputError("inputs", f"got {len(request.inputs)} inputs; model "
                                    f"{model.spec.name!r} takes one, {INPUT_NAME!r}")
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise InvalidInputError(f"{tensor.where.tensor}.name", f"{tensor.name!r} is not an input "
                                    f"of model {model.spec.name!r}; expected {INPUT_NAME!r}")
        if tensor.parameters:
            _check_parameters(tensor.parameters, f"{tensor.where.tensor}.parameters")
        # pixels() inlined: awaiting it would make a coroutine per call even when no picture needs
        # decoding (Predict's hot path).
        count, images = read(plane, model, tensor)
        if images is None:
            images = await decode(plane, model, tensor, count, decoder, until)
        read_ns = time.perf_counter_ns() - started
        probabilities = await plane.predict(model, images, until)
    except BaseException:  # refused, failed, or cancelled: not answered
        statistics.failed(started)
        raise
    return InferResponse(model, probabilities, names, request.id, statistics, started,
                         time.perf_counter_ns(), read_ns)
