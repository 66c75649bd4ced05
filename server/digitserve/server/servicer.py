"""The gRPC edge of ``digitserve.v1``: decodes protobuf requests into numpy (server.pixels), calls
the data plane, encodes replies; domain errors become status codes in server.status."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from functools import partial

import grpc
import numpy as np
import numpy.typing as npt

from digitserve.inference import Model
from digitserve.metadata import Metadata
from digitserve.server.dataplane import DataPlane, Evaluation, check_labels
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import InvalidInputError
from digitserve.server.pixels import (
    check_count,
    check_picture_sizes,
    decode_images,
    encoded_images,
    packed_pixels,
    uniform_pixels,
)
from digitserve.server.registry import ModelInfo, Registry
from digitserve.server.status import deadline, mapped_errors
from digitserve.server.wire import PackedPredictRequest, PredictionEncoder
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

class DigitServicer(pb_grpc.DigitServiceServicer):
    """digitserve.v1.DigitService over the data planes of the models served."""

    def __init__(self, router: Registry, pictures: PictureDecoder) -> None:
        self._router = router
        self._pictures = pictures
        self._encoders: dict[tuple[str, int], PredictionEncoder] = {}

    def _encoder(self, model: Model) -> PredictionEncoder:
        spec = model.spec
        encoder = self._encoders.get((spec.name, spec.version))
        if encoder is None or encoder.labels != spec.labels:
            if len(self._encoders) > 16:  # versions come and go with hot reloads
                self._encoders.clear()
            encoder = self._encoders[spec.name, spec.version] = PredictionEncoder(
                spec.name, spec.version, spec.labels)
        return encoder

    async def _decode(self, images: Sequence[pb.Image], model: Model, plane: DataPlane, field: str,
                      until: float | None) -> npt.NDArray[np.float32]:
        """The images' pixels, admitted by the model's queue first. Uniformly packed pixels (what
        clients send) are read at once; otherwise pictures among them (Images that set
        ``encoded``) are sized up here and the whole message is decoded on the picture decoder's
        threads (server.decoding), never on the event loop."""
        plane.admit(model, len(images))
        uniform = uniform_pixels(images, model.spec.input_size, field)
        if uniform is not None:
            return uniform
        found = encoded_images(images, field)
        if not found:
            return decode_images(images, model.spec.input_size, field)
        decoder = self._pictures
        check_picture_sizes(found, decoder.limits, field)
        return await decoder.run(len(found), partial(
            decode_images, images, model.spec.input_size, field, input_shape=model.spec.input_shape,
            limits=decoder.limits, deadline=until))

    @mapped_errors
    async def Predict(
        self, request: pb.PredictRequest | PackedPredictRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """Answers a serialized PredictResponse (see calls.CallInterceptor's serializer). The request
        comes as server.wire read it when its images are uniformly packed."""
        plane, model = self._router.resolve(request.model_name, request.model_version,
                                            request.version_label, split=True)
        images = None
        if isinstance(request, PackedPredictRequest):
            check_count(request.rows.shape[0], plane.max_images_per_request)
            plane.admit(model, request.rows.shape[0])  # refused before any pixel is converted
            images = packed_pixels(request.rows, request.encoding, model.spec.input_size)
            if images is None:
                request = request.message()
        until = deadline(context)
        if images is None:
            assert isinstance(request, pb.PredictRequest)
            check_count(len(request.images), plane.max_images_per_request)
            images = await self._decode(request.images, model, plane, "images", until)
        probabilities = await plane.predict(model, images, until)
        return self._encoder(model).encode(probabilities)

    @mapped_errors
    async def Evaluate(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        evaluation: Evaluation | None = None
        name = ""
        until = deadline(context)
        index = 0
        try:
            async for request in request_iterator:
                field = f"requests[{index}].images"
                if evaluation is None:
                    name = request.model_name
                    evaluation = Evaluation(self._router.model(name))
                elif request.model_name not in ("", name):
                    raise InvalidInputError(
                        f"requests[{index}].model_name",
                        f"{request.model_name!r} differs from {name or 'the default model'!r} named "
                        "at the start of this stream")
                plane = evaluation.plane
                model = evaluation.model_for(request.model_version, request.version_label)
                check_count(len(request.images), plane.max_images_per_request, field)
                images = await self._decode(request.images, model, plane, field, until)
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
        response = pb.EvaluateResponse(
            count=metrics.count,
            accuracy=metrics.accuracy,
            mean_cross_entropy=metrics.mean_cross_entropy,
            labels=metrics.labels,
            model_name=model.spec.name,
            model_version=model.spec.version,
        )
        for row in metrics.confusion_matrix:
            response.confusion_matrix.add(counts=row)
        for label, p, r, f, s in zip(
            metrics.labels, metrics.precision, metrics.recall, metrics.f1, metrics.support,
            strict=True,
        ):
            response.per_class.add(label=label, precision=p, recall=r, f1=f, support=s)
        return response

    @mapped_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        server = self._router.model(request.model_name)
        plane = server.plane
        model = server.resolve(request.model_version, request.version_label)
        metadata = Metadata.from_json(model.metadata)
        return pb.GetModelInfoResponse(
            model_name=model.spec.name,
            model_version=model.spec.version,
            input_size=model.spec.input_size,
            input_shape=list(model.spec.input_shape),
            input_scale=model.spec.input_scale,
            labels=list(model.spec.labels),
            preset=metadata.preset or "",
            test_accuracy=(metadata.metrics.test_accuracy if metadata.metrics else None) or 0.0,
            created_at=metadata.created_at or "",
            metadata_json=json.dumps(model.metadata, sort_keys=True),
            max_images_per_request=plane.max_images_per_request,
            loaded_versions=server.loaded_versions,
            inference_path=model.inference_path,
            refused_versions=[
                pb.RefusedVersion(version=v, reason=r) for v, r in sorted(server.refused.items())
            ],
            version_labels=sorted(k for k, v in server.labels.items() if v == model.spec.version),
            low_confidence_threshold=server.settings.low_confidence,
        )

    @mapped_errors
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[_model_status(info) for info in self._router.model_infos(request.model_name)],
            default_model=self._router.default_model,
            config_path=self._router.config_path,
            config_error=self._router.config_error,
        )


_MODEL_STATES = {"loading": pb.MODEL_STATE_LOADING, "serving": pb.MODEL_STATE_SERVING}
_VERSION_STATES = {"available": pb.VERSION_STATE_AVAILABLE, "serving": pb.VERSION_STATE_SERVING,
                   "refused": pb.VERSION_STATE_REFUSED}


def _model_status(info: ModelInfo) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=info.name,
        state=_MODEL_STATES[info.state],
        reason=info.reason,
        default_version=info.default_version,
        labels=dict(info.labels),
        canary_weight=info.canary_weight,
        versions=[pb.VersionStatus(version=v.version, state=_VERSION_STATES[v.state], reason=v.reason,
                                   labels=list(v.labels)) for v in info.versions],
    )
