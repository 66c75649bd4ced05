"""Training as a pure function: ``run(TrainConfig) -> summary``, which trains a preset on MNIST,
evaluates it the way the server does and publishes it as a new model version."""

from __future__ import annotations

import importlib
import logging
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from digitserve.idx import Split, load_split, md5_uncompressed, scale_pixels
from digitserve.metadata import (
    FORMAT_VERSION,
    Baseline,
    CheckSetInfo,
    ClassFigures,
    DataInfo,
    Inference,
    InputSpec,
    Metadata,
    Metrics,
    sha256_file,
)
from digitserve.metrics import ClassificationMetrics, MetricsAccumulator, classification_metrics
from digitserve.repository import (
    CHECK_SET_FILE,
    LITERT_FILE,
    MODEL_FILE,
    REPORT_DIR,
    ModelRepository,
    RepositoryError,
    publish_error,
)
from digitserve.trainer.errors import TrainerError
from digitserve.trainer.presets import Preset, build_model, build_optimizer, get_preset

if TYPE_CHECKING:
    from digitserve.inference import KerasModel

logger = logging.getLogger(__name__)

# Test images per prediction call, the batches the client streams Evaluate in: identical figures.
EVALUATE_BATCH = 1000
CHECK_SET_SIZE = 500  # the first official test images, into ``check_set.npz`` for the server's gate
LABELS = [str(digit) for digit in range(10)]
BASELINES = ("random-forest",)
FOREST_TREES = 100


@dataclass
class TrainConfig:
    """What to train and where to publish it."""

    data_dir: str | Path  # the four MNIST IDX files (``.gz`` or plain)
    model_repo: str | Path  # the model repository's root
    name: str  # the model's name; each run publishes its next version
    preset: str = "default"  # a key of ``trainer.presets.PRESETS``
    epochs: int | None = None  # overrides the preset's
    batch_size: int | None = None  # overrides the preset's
    seed: int = 42  # Python, NumPy, TensorFlow and Keras (and the seed preset's hold-out split)
    baseline: str | None = None  # ``random-forest``: fitted on the same data, reported beside
    report: bool = True  # the PNG figures in the version's ``report/``
    # Keras ``fit``'s (0 silent, 1 a progress bar, 2 a line per epoch; the summary unless 0); None:
    # 1 when standard output (where Keras writes) is a terminal, else 2.
    verbose: int | None = None


@dataclass
class TrainingData:
    """The arrays a run trains and tests on, loaded once (``load_data``): the sweep trains every
    point on the same ones."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.uint8]
    x_holdout: npt.NDArray[np.float32] | None
    y_holdout: npt.NDArray[np.uint8] | None
    test: Split
    x_test: npt.NDArray[np.float32]
    files: dict[str, dict[str, str]]
    data_dir: str | Path

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's shape, (rows, cols)."""
        return tuple(int(d) for d in self.test.images.shape[1:])


@dataclass
class Trained:
    """A preset fitted on loaded data (``train_preset``): what ``publish`` publishes."""

    preset: Preset  # with the overrides it was trained with
    model: Any  # the fitted keras.Model
    history: dict[str, list[float]]  # Keras' per-epoch figures (``val_*`` on the hold-out part)
    seconds: float  # the time ``fit`` took (with the per-epoch hold-out figures)
    seed: int


def scale_images(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Flattens (N, rows, cols) uint8 images to (N, rows*cols) float32 in [0, 1], the product's
    one pixel scale (``uint8 / 255``)."""
    return scale_pixels(images.reshape(images.shape[0], -1))


def one_hot(labels: npt.NDArray[np.integer[Any]], num_classes: int) -> npt.NDArray[np.float32]:
    """One-hot rows, encoded with scikit-learn's OneHotEncoder as the tutorial does (with the
    categories fixed, so a sample lacking a class still gets ``num_classes`` columns)."""
    from sklearn.preprocessing import OneHotEncoder

    encoder = OneHotEncoder(categories=[np.arange(num_classes)], sparse_output=False, dtype=np.float32)
    encoded: npt.NDArray[np.float32] = encoder.fit_transform(labels.reshape(-1, 1).astype(np.int64))
    return encoded


def _describe_files(splits: list[Split]) -> dict[str, dict[str, str]]:
    return {path.name: {"md5_uncompressed": md5_uncompressed(path), "sha256": sha256_file(path)}
            for split in splits for path in (split.images_path, split.labels_path)}


def load_data(data_dir: str | Path, *, holdout_fraction: float = 0.0, seed: int = 42) -> TrainingData:
    """The training and official test images of ``data_dir``, scaled; ``holdout_fraction`` of
    the training images set aside by ``train_test_split`` (``random_state=seed``)."""
    train, test = (load_split(data_dir, split) for split in ("train", "t10k"))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise TrainerError(f"training images are {train.images.shape[1:]} but test images are "
                           f"{test.images.shape[1:]}")
    logger.info("loaded %d training and %d test images of %s from %s", len(train), len(test),
                "×".join(map(str, train.images.shape[1:])), data_dir)
    x_all = scale_images(train.images)
    x_holdout: npt.NDArray[np.float32] | None = None
    y_holdout: npt.NDArray[np.uint8] | None = None
    if holdout_fraction > 0:
        from sklearn.model_selection import train_test_split

        x_train, x_holdout, y_train, y_holdout = train_test_split(
            x_all, train.labels, test_size=holdout_fraction, random_state=seed)
    else:
        x_train, y_train = x_all, train.labels
    return TrainingData(x_train, y_train, x_holdout, y_holdout, test, scale_images(test.images),
                        _describe_files([train, test]), data_dir)


def evaluate(model: Any, x: npt.NDArray[np.float32], y: npt.NDArray[np.integer[Any]]
             ) -> tuple[ClassificationMetrics, npt.NDArray[np.float32]]:
    """Metrics and probabilities of ``model`` (a ``digitserve.inference.Model``) on a labelled set,
    predicted in consecutive chunks of ``EVALUATE_BATCH`` images as the server's Evaluate does."""
    accumulator = MetricsAccumulator(LABELS)
    chunks = []
    for start in range(0, x.shape[0], EVALUATE_BATCH):
        probs = model.predict(x[start : start + EVALUATE_BATCH])
        accumulator.update(y[start : start + EVALUATE_BATCH], probs)
        chunks.append(probs)
    all_probs = np.concatenate(chunks) if chunks else np.zeros((0, len(LABELS)), np.float32)
    return accumulator.result(), all_probs


def fit_random_forest(data: TrainingData, seed: int) -> tuple[Any, float]:
    """scikit-learn's RandomForestClassifier (100 trees, every core) fitted on the training
    images, and the seconds the fit took."""
    from sklearn.ensemble import RandomForestClassifier

    logger.info("fitting the random-forest baseline on %d images", data.x_train.shape[0])
    started = time.perf_counter()
    forest = RandomForestClassifier(n_estimators=FOREST_TREES, n_jobs=-1, random_state=seed)
    forest.fit(data.x_train, data.y_train)
    return forest, time.perf_counter() - started


def _random_forest(data: TrainingData, seed: int) -> Baseline:
    started = time.perf_counter()
    forest, _ = fit_random_forest(data, seed)
    predicted = forest.predict(data.x_test)
    seconds = time.perf_counter() - started
    accuracy = float(np.mean(predicted == data.test.labels))
    logger.info("random-forest baseline: test accuracy %.4f in %.1fs", accuracy, seconds)
    return Baseline(name="random-forest", n_estimators=FOREST_TREES, accuracy=accuracy, seconds=seconds)


def _versions() -> dict[str, str]:
    modules = {"tensorflow": "tensorflow", "keras": "keras", "numpy": "numpy", "scikit-learn": "sklearn",
               "matplotlib": "matplotlib"}
    return {"python": platform.python_version(),
            **{name: str(importlib.import_module(module).__version__) for name, module in modules.items()}}


def _is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (a progress bar's carriage returns redraw one line there;
    in a file or a pipe they would pile up, so those get a line per epoch)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def run(config: TrainConfig) -> dict[str, Any]:
    """Trains ``config.preset`` on the training images (or the preset's train part), evaluates the
    saved and reloaded model on the official test images and publishes it with its metadata,
    check set and report; returns the summary. IdxError (data), TrainerError (configuration),
    RepositoryError (publishing). The same seed gives the same metrics."""
    preset = get_preset(config.preset).with_overrides(epochs=config.epochs, batch_size=config.batch_size)
    if config.baseline is not None and config.baseline not in BASELINES:
        raise TrainerError(f"unknown baseline {config.baseline!r} (known: {', '.join(BASELINES)})")
    check_publishable(config.model_repo, config.name)
    data = load_data(config.data_dir, holdout_fraction=preset.holdout_fraction, seed=config.seed)
    trained = train_preset(preset, data, seed=config.seed, verbose=config.verbose)
    baseline = _random_forest(data, config.seed) if config.baseline == "random-forest" else None
    return publish(config, trained, data, baseline=baseline)


def check_publishable(model_repo: str | Path, name: str) -> None:
    """RepositoryError for an invalid model name or a repository it could not publish into: asked
    before the training, not after."""
    ModelRepository(model_repo).versions(name)
    if (problem := publish_error(model_repo, name)) is not None:
        raise RepositoryError(problem)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy, TensorFlow and Keras and makes TensorFlow's ops deterministic: the
    same seed then gives the same weights, batches and metrics."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def train_preset(preset: Preset, data: TrainingData, *, seed: int, verbose: int | None = None,
                 summary: bool = True) -> Trained:
    """Builds ``preset``'s model and fits it on ``data``'s training images, seeded first
    (``seed_everything``), its hold-out part (if any) the validation data. ``verbose`` is Keras
    ``fit``'s (None: 1 on a terminal, else 2); ``summary`` prints the model's unless it is 0."""
    seed_everything(seed)
    model = build_model(preset, input_shape=data.input_shape, num_classes=len(LABELS))
    steps_per_epoch = -(-data.x_train.shape[0] // preset.batch_size)
    model.compile(optimizer=build_optimizer(preset, steps_per_epoch), loss=preset.loss, metrics=["accuracy"])
    verbose = verbose if verbose is not None else 1 if _is_terminal(sys.stdout) else 2
    if verbose and summary:
        model.summary()
    validation = None
    if data.x_holdout is not None and data.y_holdout is not None:
        validation = (data.x_holdout, one_hot(data.y_holdout, len(LABELS)))
    logger.info("training preset %s for %d epoch(s) of %d batches of %d, seed %d", preset.name, preset.epochs,
                steps_per_epoch, preset.batch_size, seed)
    started = time.perf_counter()
    fitted = model.fit(data.x_train, one_hot(data.y_train, len(LABELS)), epochs=preset.epochs,
                       batch_size=preset.batch_size, validation_data=validation, shuffle=True,
                       verbose=verbose)
    seconds = time.perf_counter() - started
    history = {key: [float(v) for v in values] for key, values in fitted.history.items()}
    logger.info("trained in %.1fs", seconds)
    return Trained(preset, model, history, seconds, seed)


def publish(config: TrainConfig, trained: Trained, data: TrainingData, *, baseline: Baseline | None = None,
            sweep_page: str | None = None) -> dict[str, Any]:
    """Publishes ``trained`` as the next version of ``config.name`` in ``config.model_repo``: the
    model, its figures measured on the saved and reloaded model as the server computes them, the
    check set, the LiteRT flatbuffer and (``config.report``) the report, ``sweep_page`` (HTML)
    copied into it and linked from its index. Returns the summary ``run`` returns."""
    preset, model, history, train_seconds = trained.preset, trained.model, trained.history, trained.seconds
    repository = ModelRepository(config.model_repo)
    outcome: dict[str, Any] = {}

    def build(staging: Path, version: int) -> dict[str, Any]:
        model.save(staging / MODEL_FILE)
        draft = draft_metadata(config, preset, data, version)
        evaluation = _evaluate_saved(staging, draft, data)
        metrics = evaluation.metrics.model_copy(update={"baseline": baseline})
        metadata = draft.model_copy(update={
            "inference": evaluation.inference, "metrics": metrics,
            "check_set": evaluation.check_set,
            "history": {key: tuple(values) for key, values in history.items()},
            "train_seconds": train_seconds, "report": (),
        })
        outcome["evaluation"] = evaluation
        if config.report:
            metadata = metadata.model_copy(update={"report": write(staging, metadata)})
        outcome["metrics"] = metrics
        outcome["metadata"] = metadata
        return metadata.to_json()

    def report(staging: Path, version: int, document: dict[str, Any]) -> None:
        """Rewrites the report titled with ``version`` when another publisher took the one before;
        ``document`` (the repository's) gets the renumbered metadata."""
        metadata = outcome["metadata"].model_copy(update={"version": version})
        metadata = metadata.model_copy(update={"report": write(staging, metadata)})
        outcome["metadata"] = metadata
        document.update(metadata.to_json())

    def write(staging: Path, metadata: Metadata) -> tuple[str, ...]:
        """Writes the report of ``metadata`` (titled with its version); returns its files."""
        from digitserve.trainer.report import write_report

        evaluation: _Evaluation = outcome["evaluation"]
        written = write_report(
            staging / REPORT_DIR, title=f"{config.name} v{metadata.version} ({preset.name})", labels=LABELS,
            confusion_matrix=evaluation.test.confusion_matrix, history=history, images=data.test.images,
            y_true=data.test.labels, y_pred=np.argmax(evaluation.test_probs, axis=1), metadata=metadata,
            sweep_page=sweep_page)
        return tuple(path.relative_to(staging).as_posix() for path in written)

    version, path = repository.publish(config.name, build, renumber=report if config.report else None)
    metrics: Metrics = outcome["metrics"]
    summary: dict[str, Any] = {
        "name": config.name, "version": version, "path": str(path), "preset": preset.name,
        "seed": trained.seed, "epochs": preset.epochs, "batch_size": preset.batch_size,
        "test_accuracy": metrics.test_accuracy, "test_loss": metrics.test_loss,
        "test_size": int(data.x_test.shape[0]), "train_size": int(data.x_train.shape[0]),
        "train_seconds": train_seconds,
    }
    if metrics.holdout_accuracy is not None:
        summary.update(holdout_accuracy=metrics.holdout_accuracy, holdout_loss=metrics.holdout_loss)
    if baseline is not None:
        summary.update(baseline=baseline.name, baseline_accuracy=baseline.accuracy,
                       baseline_seconds=baseline.seconds)
    summary["report"] = str(path / REPORT_DIR) if config.report else None
    logger.info("model %s version %d: test accuracy %.4f, loss %.4f", config.name, version,
                summary["test_accuracy"], summary["test_loss"])
    return summary


def draft_metadata(config: TrainConfig, preset: Preset, data: TrainingData, version: int) -> Metadata:
    """The metadata known before the saved model is evaluated."""
    input_shape = data.input_shape
    return Metadata(
        format=FORMAT_VERSION, name=config.name, version=version, preset=preset.name,
        hyperparameters=preset.hyperparameters(), seed=config.seed,
        input=InputSpec(shape=tuple(input_shape), size=int(np.prod(input_shape)), scale=1.0 / 255.0,
                        dtype="float32"),
        labels=tuple(LABELS),
        data=DataInfo(dir=str(Path(config.data_dir).resolve()),
                      files={name: dict(entry) for name, entry in data.files.items()},
                      train_size=int(data.x_train.shape[0]), test_size=int(data.x_test.shape[0]),
                      holdout_size=None if data.x_holdout is None else int(data.x_holdout.shape[0])),
        versions=_versions(), created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


@dataclass
class _Evaluation:
    metrics: Metrics  # the metadata's ``metrics``, ``check_set`` (what the gate should find), ``inference``
    check_set: CheckSetInfo
    inference: Inference
    test: ClassificationMetrics
    test_probs: npt.NDArray[np.float32]


def _evaluate_saved(staging: Path, metadata: Metadata, data: TrainingData) -> _Evaluation:
    """Reloads the saved model as the server does and computes every metric through it."""
    import keras

    reloaded = keras.saving.load_model(staging / MODEL_FILE, compile=False, safe_mode=True)
    served, metrics, test_metrics, test_probs = measure(reloaded, metadata, data)
    agreement = served.agreement
    inference = Inference(path=agreement.path, probe_images=agreement.images,
                          litert_max_diff=agreement.litert_diff,
                          tensorflow_batch1_max_diff=agreement.tensorflow_spread)
    if served.litert is not None:
        # The flatbuffer these metrics are computed with, for servers without TensorFlow; they
        # check it against model.predict's probabilities on the check set (saved with it below)
        # within the tolerance it met here.
        (staging / LITERT_FILE).write_bytes(served.litert.flatbuffer)
        inference = inference.model_copy(
            update={"litert_file": LITERT_FILE, "tolerance": agreement.tolerance})

    # The server's hot-reload gate predicts these images in one call and compares the figures.
    count = min(CHECK_SET_SIZE, data.x_test.shape[0])
    probe = scale_images(data.test.images[:count])
    check_images = data.test.images[:count].reshape(count, -1)
    check_labels = data.test.labels[:count]
    reference = np.asarray(reloaded.predict(probe, verbose=0), dtype=np.float32)
    # The label names too: the server refuses metadata whose labels differ from them.
    np.savez_compressed(staging / CHECK_SET_FILE, images=check_images, labels=check_labels,
                        reference=reference, label_names=np.array(LABELS))
    check_metrics = classification_metrics(LABELS, check_labels, served.predict(probe))
    check_set = CheckSetInfo(file=CHECK_SET_FILE, count=count, accuracy=check_metrics.accuracy,
                             mean_cross_entropy=check_metrics.mean_cross_entropy)
    return _Evaluation(metrics, check_set, inference, test_metrics, test_probs)


def measure(keras_model: Any, metadata: Metadata, data: TrainingData
            ) -> tuple[KerasModel, Metrics, ClassificationMetrics, npt.NDArray[np.float32]]:
    """``keras_model`` served as the server serves it (``KerasModel``: LiteRT where it agrees on the
    check set's images) and its test and hold-out figures through that path, as Evaluate computes
    them: the served model, the metadata's metrics, the test set's metrics and probabilities."""
    from digitserve.inference import KerasModel

    count = min(CHECK_SET_SIZE, data.x_test.shape[0])
    # The check set is also the server's probe for choosing its inference path: the same images
    # give the same choice, so these figures are the ones the server's Evaluate will compute.
    probe = scale_images(data.test.images[:count])
    served = KerasModel(keras_model, metadata, probe=probe)
    test_metrics, test_probs = evaluate(served, data.x_test, data.test.labels)
    metrics = Metrics(
        test_accuracy=test_metrics.accuracy,
        test_loss=test_metrics.mean_cross_entropy,
        confusion_matrix=tuple(tuple(row) for row in test_metrics.confusion_matrix),
        per_class=tuple(ClassFigures(**entry) for entry in test_metrics.to_dict()["per_class"]))
    if data.x_holdout is not None and data.y_holdout is not None:
        holdout_metrics, _ = evaluate(served, data.x_holdout, data.y_holdout)
        metrics = metrics.model_copy(update={"holdout_accuracy": holdout_metrics.accuracy,
                                             "holdout_loss": holdout_metrics.mean_cross_entropy})
    return served, metrics, test_metrics, test_probs
