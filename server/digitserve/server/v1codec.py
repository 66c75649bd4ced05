"""The converter of the ``digitserve.v1`` edge: Images (repeated floats, uint8 or float32 bytes,
pictures; or the packed rows server.wire reads straight from a Predict's bytes) into the neutral
input of server.infertypes, named as v1 names them (``images[3].float32[17]``,
``requests[2].images[0].encoded``), and the answers back into v1's messages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from digitserve.idx import scale_pixels
from digitserve.metadata import Metadata
from digitserve.server.dataplane import Evaluation, check_labels
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import InvalidInputError
from digitserve.server.infer import infer, pixels
from digitserve.server.infertypes import INPUT_NAME, InferInput, InferRequest, Where
from digitserve.server.registry import ModelInfo, Registry
from digitserve.server.wire import PACKED, PackedPredictRequest, PredictionEncoder
from digitserve.v1 import digit_service_pb2 as pb

_DATATYPES = {"uint8": "UINT8", "float32": "FP32"}


_PREDICT = {kind: Where("images", "images", "images", f"images[{{i}}].{kind}[{{j}}]") for kind in PACKED}


def _where(field: str, kind: str) -> Where:
    """How v1 names packed rows: ``images[3].float32[17]`` (``field``: ``images`` of a Predict)."""
    return _PREDICT[kind] if field == "images" else Where(field, field, field,
                                                           f"{field}[{{i}}].{kind}[{{j}}]")


def _pixels(image: pb.Image, kind: str | None, size: int, field: str) -> Any:
    """One image's pixels (not yet checked); InvalidInputError for none or the wrong number."""
    if kind == "float32":
        if len(image.float32) != 4 * size:
            raise InvalidInputError(f"{field}.float32", f"got {len(image.float32)} bytes, expected "
                                    f"{4 * size} ({size} little-endian float32 pixels)")
        return np.frombuffer(image.float32, dtype="<f4")
    if kind == "uint8":
        if len(image.uint8) != size:
            raise InvalidInputError(f"{field}.uint8", f"got {len(image.uint8)} bytes, expected "
                                    f"{size} (one byte per pixel)")
        return scale_pixels(np.frombuffer(image.uint8, dtype=np.uint8))
    if kind == "floats":
        if len(image.floats.values) != size:
            raise InvalidInputError(f"{field}.floats.values", f"got {len(image.floats.values)} "
                                    f"pixels, expected {size}")
        return image.floats.values
    raise InvalidInputError(field, "no pixels; set one of floats, uint8, float32 or encoded")


def images_input(images: Sequence[pb.Image] | PackedPredictRequest, size: int,
                 field: str = "images") -> InferInput:
    """The images of ``size`` pixels as one input: uniformly packed ones (what clients send) as
    their rows of bytes; others decoded image by image, the first image without pixels or of the
    wrong length kept as the input's fault, raised in its turn among the pictures."""
    if isinstance(images, PackedPredictRequest):
        rows, encoding = images.rows, images.encoding
        if rows.shape[1] == PACKED[encoding].itemsize * size:
            return InferInput(INPUT_NAME, _DATATYPES[encoding], [rows.shape[0], size], rows,
                              _where(field, encoding), raw=True)
        return images_input(images.message().images, size, field)
    kind = images[0].WhichOneof("pixels") if images else None
    if kind in PACKED:
        parts = [getattr(image, kind) for image in images]
        # An image that set another field reads as b"" here, so equal lengths mean all of this kind.
        if set(map(len, parts)) == {PACKED[kind].itemsize * size}:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            rows = np.frombuffer(data, np.uint8).reshape(len(parts), -1)
            return InferInput(INPUT_NAME, _DATATYPES[kind], [len(parts), size], rows,
                              _where(field, kind), raw=True)
    out = np.empty((len(images), size), np.float32)
    encodings: list[str] = []
    pictures: list[tuple[int, str, bytes]] = []
    fault: InvalidInputError | None = None
    fault_row = -1
    for i, image in enumerate(images):
        kind = image.WhichOneof("pixels")
        encodings.append("floats.values" if kind == "floats" else kind or "")
        if kind == "encoded":
            pictures.append((i, f"{field}[{i}].encoded", image.encoded))
        elif fault is None:
            try:
                out[i] = _pixels(image, kind, size, f"{field}[{i}]")
            except InvalidInputError as error:
                fault, fault_row = error, i
    where = Where(field, field, field, f"{field}[{{i}}].{{e}}[{{j}}]", encodings)
    return InferInput(INPUT_NAME, "FP32", [len(images), size], out, where, pictures=pictures,
                      fault=fault, fault_row=fault_row)


@lru_cache(maxsize=16)  # versions come and go with hot reloads
def _encoder(name: str, version: int, labels: tuple[str, ...]) -> PredictionEncoder:
    return PredictionEncoder(name, version, labels)


async def predict(router: Registry, pictures: PictureDecoder,
                  request: pb.PredictRequest | PackedPredictRequest, until: float | None) -> bytes:
    """A serialized PredictResponse (see servicer.add_to_server's serializer)."""
    plane, model = router.resolve(request.model_name, request.model_version, request.version_label,
                                  split=True)
    inputs = [images_input(request if isinstance(request, PackedPredictRequest) else request.images,
                           model.spec.input_size)]
    call = InferRequest(request.model_name, inputs, request.model_version, request.version_label)
    response = await infer(plane, model, call, pictures, until)
    spec = model.spec
    answer = _encoder(spec.name, spec.version, spec.labels).encode(response.probabilities)
    response.answered()
    return answer


async def evaluate(router: Registry, pictures: PictureDecoder,
                   requests: AsyncIterator[pb.EvaluateRequest], until: float | None) -> pb.EvaluateResponse:
    """Metrics of one model version over the stream's labelled images."""
    evaluation: Evaluation | None = None
    name = ""
    index = 0
    try:
        async for request in requests:
            if evaluation is None:
                name = request.model_name
                evaluation = Evaluation(router.model(name))
            elif request.model_name not in ("", name):
                raise InvalidInputError(
                    f"requests[{index}].model_name", f"{request.model_name!r} differs from "
                    f"{name or 'the default model'!r} named at the start of this stream")
            model = evaluation.model_for(request.model_version, request.version_label)
            tensor = images_input(request.images, model.spec.input_size, f"requests[{index}].images")
            images = await pixels(evaluation.plane, model, tensor, pictures, until)
            labels = np.asarray(request.labels, dtype=np.int64)
            try:
                check_labels(labels, images.shape[0], len(model.spec.labels))
            except InvalidInputError as exc:
                raise InvalidInputError(f"requests[{index}].{exc.field}", exc.description) from None
            await evaluation.add(model, images, labels, until)
            index += 1
    finally:
        if evaluation is not None:
            evaluation.release()
    if evaluation is None:
        raise InvalidInputError("images", "the stream held no images; expected at least 1")
    model, metrics = evaluation.result()
    return pb.EvaluateResponse(
        count=metrics.count, accuracy=metrics.accuracy,
        mean_cross_entropy=metrics.mean_cross_entropy, labels=metrics.labels,
        model_name=model.spec.name, model_version=model.spec.version,
        confusion_matrix=[pb.ConfusionRow(counts=row) for row in metrics.confusion_matrix],
        per_class=[pb.ClassMetrics(label=label, precision=p, recall=r, f1=f, support=s)
                   for label, p, r, f, s in zip(metrics.labels, metrics.precision, metrics.recall,
                                                metrics.f1, metrics.support, strict=True)],
    )


def model_info(router: Registry, request: pb.GetModelInfoRequest) -> pb.GetModelInfoResponse:
    server = router.model(request.model_name)
    plane = server.plane
    model = server.resolve(request.model_version, request.version_label)
    spec, metadata = model.spec, Metadata.from_json(model.metadata)
    return pb.GetModelInfoResponse(
        model_name=spec.name, model_version=spec.version, input_size=spec.input_size,
        input_shape=list(spec.input_shape), input_scale=spec.input_scale, labels=list(spec.labels),
        preset=metadata.preset or "",
        test_accuracy=(metadata.metrics.test_accuracy if metadata.metrics else None) or 0.0,
        created_at=metadata.created_at or "",
        metadata_json=json.dumps(model.metadata, sort_keys=True),
        max_images_per_request=plane.max_images_per_request,
        loaded_versions=server.loaded_versions, inference_path=model.inference_path,
        refused_versions=[pb.RefusedVersion(version=v, reason=r) for v, r in sorted(server.refused.items())],
        version_labels=sorted(k for k, v in server.labels.items() if v == spec.version),
        low_confidence_threshold=server.settings.low_confidence,
    )


_MODEL_STATES = {"loading": pb.MODEL_STATE_LOADING, "serving": pb.MODEL_STATE_SERVING}
_VERSION_STATES = {"available": pb.VERSION_STATE_AVAILABLE, "serving": pb.VERSION_STATE_SERVING,
                   "refused": pb.VERSION_STATE_REFUSED}


def _model_status(info: ModelInfo) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=info.name, state=_MODEL_STATES[info.state], reason=info.reason,
        default_version=info.default_version, labels=dict(info.labels),
        canary_weight=info.canary_weight,
        versions=[pb.VersionStatus(version=v.version, state=_VERSION_STATES[v.state], reason=v.reason,
                                   labels=list(v.labels)) for v in info.versions],
        version_policy=info.version_policy,
    )


def list_models(router: Registry, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[_model_status(info) for info in router.model_infos(request.model_name)],
        default_model=router.default_model, config_path=router.config_path,
        config_error=router.config_error)
