from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_SERVING: _ClassVar[ModelState]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_AVAILABLE: _ClassVar[VersionState]
    VERSION_STATE_SERVING: _ClassVar[VersionState]
    VERSION_STATE_REFUSED: _ClassVar[VersionState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_SERVING: ModelState
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_AVAILABLE: VersionState
VERSION_STATE_SERVING: VersionState
VERSION_STATE_REFUSED: VersionState

class Image(_message.Message):
    __slots__ = ("floats", "uint8", "float32", "encoded")
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    UINT8_FIELD_NUMBER: _ClassVar[int]
    FLOAT32_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    floats: FloatPixels
    uint8: bytes
    float32: bytes
    encoded: bytes
    def __init__(self, floats: _Optional[_Union[FloatPixels, _Mapping]] = ..., uint8: _Optional[bytes] = ..., float32: _Optional[bytes] = ..., encoded: _Optional[bytes] = ...) -> None: ...

class FloatPixels(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "model_version", "model_name", "version_label")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model_version: int
    model_name: str
    version_label: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., model_version: _Optional[int] = ..., model_name: _Optional[str] = ..., version_label: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("probabilities", "class_index", "label", "probability")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    class_index: int
    label: str
    probability: float
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model_name", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model_name: str
    model_version: int
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("images", "labels", "model_version", "model_name", "version_label")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    labels: _containers.RepeatedScalarFieldContainer[int]
    model_version: int
    model_name: str
    version_label: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., labels: _Optional[_Iterable[int]] = ..., model_version: _Optional[int] = ..., model_name: _Optional[str] = ..., version_label: _Optional[str] = ...) -> None: ...

class ClassMetrics(_message.Message):
    __slots__ = ("label", "precision", "recall", "f1", "support")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    def __init__(self, label: _Optional[str] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class ConfusionRow(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("count", "accuracy", "mean_cross_entropy", "confusion_matrix", "per_class", "labels", "model_name", "model_version")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_CROSS_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    count: int
    accuracy: float
    mean_cross_entropy: float
    confusion_matrix: _containers.RepeatedCompositeFieldContainer[ConfusionRow]
    per_class: _containers.RepeatedCompositeFieldContainer[ClassMetrics]
    labels: _containers.RepeatedScalarFieldContainer[str]
    model_name: str
    model_version: int
    def __init__(self, count: _Optional[int] = ..., accuracy: _Optional[float] = ..., mean_cross_entropy: _Optional[float] = ..., confusion_matrix: _Optional[_Iterable[_Union[ConfusionRow, _Mapping]]] = ..., per_class: _Optional[_Iterable[_Union[ClassMetrics, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_version", "model_name", "version_label")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABEL_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    model_name: str
    version_label: str
    def __init__(self, model_version: _Optional[int] = ..., model_name: _Optional[str] = ..., version_label: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "input_size", "input_shape", "input_scale", "labels", "preset", "test_accuracy", "created_at", "metadata_json", "max_images_per_request", "loaded_versions", "refused_versions", "inference_path", "version_labels", "low_confidence_threshold")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_LABELS_FIELD_NUMBER: _ClassVar[int]
    LOW_CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: int
    input_size: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_scale: float
    labels: _containers.RepeatedScalarFieldContainer[str]
    preset: str
    test_accuracy: float
    created_at: str
    metadata_json: str
    max_images_per_request: int
    loaded_versions: _containers.RepeatedScalarFieldContainer[int]
    refused_versions: _containers.RepeatedCompositeFieldContainer[RefusedVersion]
    inference_path: str
    version_labels: _containers.RepeatedScalarFieldContainer[str]
    low_confidence_threshold: float
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., input_size: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_scale: _Optional[float] = ..., labels: _Optional[_Iterable[str]] = ..., preset: _Optional[str] = ..., test_accuracy: _Optional[float] = ..., created_at: _Optional[str] = ..., metadata_json: _Optional[str] = ..., max_images_per_request: _Optional[int] = ..., loaded_versions: _Optional[_Iterable[int]] = ..., refused_versions: _Optional[_Iterable[_Union[RefusedVersion, _Mapping]]] = ..., inference_path: _Optional[str] = ..., version_labels: _Optional[_Iterable[str]] = ..., low_confidence_threshold: _Optional[float] = ...) -> None: ...

class RefusedVersion(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model", "config_path", "config_error")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_ERROR_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    default_model: str
    config_path: str
    config_error: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., default_model: _Optional[str] = ..., config_path: _Optional[str] = ..., config_error: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "reason", "default_version", "labels", "canary_weight", "versions", "version_policy")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CANARY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ModelState
    reason: str
    default_version: int
    labels: _containers.ScalarMap[str, int]
    canary_weight: float
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    version_policy: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., default_version: _Optional[int] = ..., labels: _Optional[_Mapping[str, int]] = ..., canary_weight: _Optional[float] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ..., version_policy: _Optional[str] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason", "labels")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: VersionState
    reason: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., reason: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...
