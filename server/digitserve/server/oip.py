"""The Open Inference Protocol (KServe V2) gRPC edge: inference.GRPCInferenceService over the same
data plane as our own API, so Triton and KServe clients can call the server."""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable
from functools import partial
from importlib import metadata as importlib_metadata

import grpc
import numpy as np
import numpy.typing as npt

from digitserve.inference import Model
from digitserve.metadata import Metadata
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.server.dataplane import DataPlane
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError
from digitserve.server.pixels import (
    V2_PICTURES,
    check_count,
    check_picture_sizes,
    decode_pictures,
    decode_tensor,
    tensor_count,
    tensor_pictures,
)
from digitserve.server.registry import ModelVersions, Registry
from digitserve.server.status import deadline, mapped_errors

logger = logging.getLogger(__name__)

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
SERVER_NAME = "digitserve"
INPUT_NAME = "images"
# Output name -> datatype; all three are returned when the request names none.
OUTPUTS = {"probabilities": "FP32", "class_index": "INT64", "label": "BYTES"}
# Triton features this server does not implement; refused rather than silently ignored.
_UNSUPPORTED_PARAMETER = re.compile(r"classification|shared_memory_.*")
_VERSION = re.compile(r"[0-9]+")
_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


def server_version() -> str:
    try:
        return importlib_metadata.version("digitserve")
    except importlib_metadata.PackageNotFoundError:  # run from a checkout without installing
        return "0+unknown"


def _check_parameters(parameters: Iterable[str], field: str) -> None:
    """Refuses parameters asking for Triton features this server lacks (``parameters`` is a
    protobuf map; iterating it gives the keys)."""
    for key in parameters:
        if _UNSUPPORTED_PARAMETER.fullmatch(key):
            raise InvalidInputError(f"{field}[{key!r}]", "is not supported by this server")


async def decode_input(
    request: oip.ModelInferRequest, model: Model, plane: DataPlane, pictures: PictureDecoder,
    until: float | None = None,
) -> tuple[npt.NDArray[np.float32], bool]:
    """The request's images as float32 (N, input_size) in [0, 1], and whether they came as raw
    bytes. InvalidInputError names the input, the field and the element that is wrong; the
    tensor itself is read by server.pixels, the codec our own API's images go through too. A
    BYTES tensor holds pictures (PNG or JPEG), decoded on ``pictures``' threads."""
    spec = model.spec
    if len(request.inputs) != 1:
        raise InvalidInputError(
            "inputs", f"got {len(request.inputs)} inputs; model {spec.name!r} takes one, {INPUT_NAME!r}"
        )
    tensor = request.inputs[0]
    field = "inputs[0]"
    if tensor.name != INPUT_NAME:
        raise InvalidInputError(
            f"{field}.name",
            f"{tensor.name!r} is not an input of model {spec.name!r}; expected {INPUT_NAME!r}",
        )
    _check_parameters(tensor.parameters, f"{field}.parameters")
    count = tensor_count(tensor, spec.input_shape, field)
    check_count(count, plane.max_images_per_request, f"{field}.shape")
    if tensor.datatype != V2_PICTURES:
        plane.admit(model, count)  # refused before any pixel is converted
        return decode_tensor(request, count, spec.input_size)
    items = tensor_pictures(request, count)
    check_picture_sizes(items, pictures.limits, field)
    pictures.admit(count)
    plane.admit(model, count)
    images = await pictures.run(count, partial(
        decode_pictures, items, spec.input_shape, pictures.limits, until))
    return images, len(request.raw_input_contents) > 0


def requested_outputs(request: oip.ModelInferRequest, model: Model) -> list[str]:
    """Names of the outputs to return, in request order (all of them when none is named)."""
    if not request.outputs:
        return list(OUTPUTS)
    names: list[str] = []
    for i, output in enumerate(request.outputs):
        if output.name not in OUTPUTS:
            raise InvalidInputError(
                f"outputs[{i}].name",
                f"{output.name!r} is not an output of model {model.spec.name!r}; "
                f"expected one of {list(OUTPUTS)}",
            )
        _check_parameters(output.parameters, f"outputs[{i}].parameters")
        if output.name not in names:
            names.append(output.name)
    return names


def _bytes_tensor(items: list[bytes]) -> bytes:
    """BYTES elements in raw form: each a 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def encode_outputs(
    model: Model, probabilities: npt.NDArray[np.float32], names: list[str], raw: bool
) -> tuple[list[oip.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Output tensors (typed contents, or raw bytes alongside when ``raw``)."""
    count, classes = probabilities.shape
    indices = np.argmax(probabilities, axis=1).astype(np.int64)
    labels = [model.spec.labels[i].encode() for i in indices.tolist()]
    tensors: list[oip.ModelInferResponse.InferOutputTensor] = []
    raw_contents: list[bytes] = []
    for name in names:
        tensor = oip.ModelInferResponse.InferOutputTensor(name=name, datatype=OUTPUTS[name])
        if name == "probabilities":
            tensor.shape.extend([count, classes])
            if raw:
                raw_contents.append(probabilities.astype("<f4").tobytes())
            else:
                tensor.contents.fp32_contents.extend(probabilities.ravel().tolist())
        elif name == "class_index":
            tensor.shape.append(count)
            if raw:
                raw_contents.append(indices.astype("<i8").tobytes())
            else:
                tensor.contents.int64_contents.extend(indices.tolist())
        else:
            tensor.shape.append(count)
            if raw:
                raw_contents.append(_bytes_tensor(labels))
            else:
                tensor.contents.bytes_contents.extend(labels)
        tensors.append(tensor)
    return tensors, raw_contents


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the data planes of the models served. A request names
    its model (the protocol has no default model); its versions are our integer versions as text,
    or a version label ("stable"), "" meaning the default version."""

    def __init__(self, router: Registry, pictures: PictureDecoder) -> None:
        self._router = router
        self._pictures = pictures
        self._version = server_version()

    def _versions(self, name: str) -> ModelVersions:
        if not name:  # the protocol names the model in every request (its URL, in REST)
            names = ", ".join(repr(info.name) for info in self._router.model_infos()) or "no model yet"
            raise ModelNotFoundError(f"model '' is not served; this server serves {names}")
        return self._router.model(name)

    def resolve(self, name: str, version: str, version_field: str,
                 split: bool = False) -> tuple[DataPlane, Model]:
        """The data plane and the model that answer for (name, version) (``split``: an unpinned
        inference call, which the canary weight may send to the canary); NOT_FOUND /
        UNAVAILABLE / INVALID_ARGUMENT as domain errors."""
        versions = self._versions(name)
        if version == "":
            return versions.plane, versions.resolve(0, split=split)
        if _LABEL.fullmatch(version):
            return versions.plane, versions.resolve(0, version)
        if not _VERSION.fullmatch(version):
            raise InvalidInputError(
                version_field, f"{version!r} is not a version; expected an integer such as '1', a "
                "version label such as 'stable', or ''"
            )
        number = int(version)
        if number < 1:
            raise ModelNotFoundError(f"model {name!r} version {version} is not served")
        return versions.plane, versions.resolve(number)

    @mapped_errors
    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @mapped_errors
    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._router.ready)

    def model_ready(self, name: str, version: str) -> bool:
        """Whether (name, version) answers now; NOT_FOUND / INVALID_ARGUMENT as domain errors."""
        try:
            self.resolve(name, version, "version")
        except ModelNotReadyError:
            return False
        return True

    @mapped_errors
    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    @mapped_errors
    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=[])

    @mapped_errors
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        return self.model_metadata(request.name, request.version)

    def model_metadata(self, name: str, version: str) -> oip.ModelMetadataResponse:
        """ModelMetadata of (name, version), for both bindings of the protocol."""
        _, model = self.resolve(name, version, "version")
        spec = model.spec
        tensor = oip.ModelMetadataResponse.TensorMetadata
        versions = Metadata.from_json(model.metadata).versions or {}
        return oip.ModelMetadataResponse(
            name=spec.name,
            versions=[str(v) for v in self._router.model(name).loaded_versions],
            platform="tensorflow_keras" if "keras" in versions else "",
            inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, spec.input_size])],
            outputs=[
                tensor(name="probabilities", datatype="FP32", shape=[-1, len(spec.labels)]),
                tensor(name="class_index", datatype="INT64", shape=[-1]),
                tensor(name="label", datatype="BYTES", shape=[-1]),
            ],
        )

    async def infer(self, request: oip.ModelInferRequest,
                    until: float | None) -> tuple[Model, npt.NDArray[np.float32], list[str], bool]:
        """One inference request of either binding (the REST edge builds the same message from
        its JSON): the model that answered, its probabilities, the outputs asked for, and whether
        the input came as raw bytes."""
        plane, model = self.resolve(request.model_name, request.model_version, "model_version",
                                    split=True)
        names = requested_outputs(request, model)
        images, raw = await decode_input(request, model, plane, self._pictures, until)
        probabilities = await plane.predict(model, images, until)
        return model, probabilities, names, raw

    @mapped_errors
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        model, probabilities, names, raw = await self.infer(request, deadline(context))
        outputs, raw_contents = encode_outputs(model, probabilities, names, raw)
        return oip.ModelInferResponse(
            model_name=model.spec.name,
            model_version=str(model.spec.version),
            id=request.id,
            outputs=outputs,
            raw_output_contents=raw_contents,
        )
