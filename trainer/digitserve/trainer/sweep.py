"""``mnist-train sweep``: the tutorial's dense network over a grid of hidden units × hidden layers,
and the Random Forest, trained on the same data; each point's figures in a table (terminal, CSV,
JSON) and a page (``sweeppage``) written after every point, the best one published on request."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from digitserve.metadata import Baseline
from digitserve.trainer.presets import SWEEP_LAYERS, SWEEP_UNITS, Preset, get_preset
from digitserve.trainer.sweeppage import (
    PAGE_FILE,
    TIME_PLOT_FILE,
    UNITS_PLOT_FILE,
    answers,
    plot_accuracy_by_time,
    plot_accuracy_by_units,
    render_page,
)
from digitserve.trainer.sweeptable import FOREST, NETWORK, Point, best_network, percent, to_csv
from digitserve.trainer.train import (
    FOREST_TREES,
    LABELS,
    TrainConfig,
    Trained,
    TrainingData,
    draft_metadata,
    fit_random_forest,
    load_data,
    measure,
    publish,
    train_preset,
)

logger = logging.getLogger(__name__)

BASE_PRESET = "seed"  # the tutorial's network, optimiser, epochs, batch size and 75/25 split
CSV_FILE = "sweep.csv"
JSON_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep, where to write its table and page, and where to publish its best point."""

    data_dir: str | Path
    out: str | Path = "sweep"  # the directory of sweep.csv, sweep.json, sweep.html and its PNGs
    units: tuple[int, ...] = SWEEP_UNITS  # hidden units per layer
    layers: tuple[int, ...] = SWEEP_LAYERS  # hidden layers
    epochs: int | None = None  # overrides the seed preset's
    batch_size: int | None = None  # overrides the seed preset's
    seed: int = 42  # before every point, and the hold-out split and the forest
    forest: bool = True  # the Random Forest after the networks
    verbose: int | None = None  # Keras fit's, as ``train``'s
    publish_best: bool = False  # as the next version of ``model_name`` in ``model_repo``
    model_repo: str | Path | None = None
    model_name: str | None = None


def point_preset(base: Preset, units: int, layers: int) -> Preset:
    """The seed preset with ``layers`` hidden layers of ``units`` units."""
    plural = "" if layers == 1 else "s"
    return dataclasses.replace(
        base, hidden_units=units, hidden_layers=layers,
        description=f"the tutorial's network with {layers} hidden layer{plural} of {units} units "
        f"(mnist-train sweep): {layers} × Dense({units}, relu) -> Dense(10, softmax), "
        f"{base.optimizer.upper()}, {base.epochs} epochs, batch {base.batch_size}, "
        f"{1 - base.holdout_fraction:.0%}/{base.holdout_fraction:.0%} split of the training images")


def _write_atomically(path: Path, content: str | bytes) -> None:
    """Writes ``content`` to ``path`` through a temporary file renamed over it: a Ctrl-C while
    writing leaves the previous file, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class _NoRetracingWarning(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning: every point is a new model,
    so new traces are what a sweep does, not a mistake to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


class Sweep:
    """One sweep: ``run()`` trains every point, writing the table and page after each;
    ``points`` holds the finished ones (also after a Ctrl-C), ``written`` how many the files
    hold. ``on_point(point)`` is called as each finishes (the CLI prints its row)."""

    def __init__(self, config: SweepConfig, on_point: Callable[[Point], None] | None = None) -> None:
        if not config.units or not config.layers or min(*config.units, *config.layers) < 1:
            raise ValueError(f"units and layers must be positive: {config.units}, {config.layers}")
        self.config = config
        self.on_point = on_point
        self.out = Path(config.out)
        self.base = get_preset(BASE_PRESET).with_overrides(epochs=config.epochs, batch_size=config.batch_size)
        self.grid = [(units, layers) for layers in config.layers for units in config.units]
        self.planned = len(self.grid) + (1 if config.forest else 0)
        self.points: list[Point] = []
        self.written = 0
        self.forest: Baseline | None = None
        self.published: dict[str, Any] | None = None
        self.started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._data: TrainingData | None = None
        self._best: tuple[Point, Trained] | None = None
        self.train_config = TrainConfig(
            data_dir=config.data_dir, model_repo=config.model_repo or "", name=config.model_name or "sweep",
            preset=BASE_PRESET, epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
            report=True, verbose=config.verbose)

    @property
    def files(self) -> dict[str, Path]:
        """What the sweep writes into ``out``."""
        return {"csv": self.out / CSV_FILE, "json": self.out / JSON_FILE, "page": self.out / PAGE_FILE,
                "units_plot": self.out / UNITS_PLOT_FILE, "time_plot": self.out / TIME_PLOT_FILE}

    def run(self) -> list[Point]:
        """Trains and measures every point in order (layer counts, then units within each, then
        the forest), writing the files after each; then publishes the best point if asked."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._data = data = load_data(self.config.data_dir, holdout_fraction=self.base.holdout_fraction,
                                      seed=self.config.seed)
        quiet = _NoRetracingWarning()
        logging.getLogger("tensorflow").addFilter(quiet)
        try:
            for units, layers in self.grid:
                self._network(data, units, layers)
        finally:
            logging.getLogger("tensorflow").removeFilter(quiet)
        if self.config.forest:
            self._random_forest(data)
        if self.config.publish_best:
            self._publish()
        return self.points

    def _announce(self, what: str) -> None:
        logger.info("sweep point %d of %d: %s", len(self.points) + 1, self.planned, what)

    def _finished(self, point: Point) -> None:
        self.points.append(point)
        holdout = "-" if point.holdout_accuracy is None else percent(point.holdout_accuracy)
        epoch = "" if point.epoch_seconds is None else f" ({point.epoch_seconds:.2f}s per epoch)"
        logger.info("sweep point %d of %d finished: %s: test accuracy %s, hold-out %s, %d parameters, "
                    "%.1fs%s", len(self.points), self.planned, point.label, percent(point.test_accuracy),
                    holdout, point.parameters, point.train_seconds, epoch)
        if self.on_point is not None:
            self.on_point(point)
        self.write()

    def _network(self, data: TrainingData, units: int, layers: int) -> None:
        preset = point_preset(self.base, units, layers)
        self._announce(f"{units}×{layers}: {layers} hidden layer(s) of {units} units, {preset.epochs} "
                       f"epoch(s) of batches of {preset.batch_size}, seed {self.config.seed}")
        trained = train_preset(preset, data, seed=self.config.seed, verbose=self.config.verbose,
                               summary=False)
        draft = draft_metadata(self.train_config, preset, data, version=1)
        served, metrics, _, _ = measure(trained.model, draft, data)
        assert metrics.test_accuracy is not None  # measure always sets it
        point = Point(
            model=NETWORK, hidden_units=units, hidden_layers=layers,
            parameters=int(trained.model.count_params()), epochs=preset.epochs,
            train_seconds=trained.seconds, epoch_seconds=trained.seconds / preset.epochs,
            holdout_accuracy=metrics.holdout_accuracy, test_accuracy=metrics.test_accuracy,
            test_loss=metrics.test_loss, inference=served.inference_path)
        if self.config.publish_best and (self._best is None or best_network([self._best[0], point]) is point):
            self._best = (point, trained)  # only the best model so far stays in memory
        self._finished(point)

    def _random_forest(self, data: TrainingData) -> None:
        self._announce(f"random forest: {FOREST_TREES} trees, seed {self.config.seed}")
        forest, seconds = fit_random_forest(data, self.config.seed)
        test_accuracy = float(forest.score(data.x_test, data.test.labels))
        holdout = None
        if data.x_holdout is not None and data.y_holdout is not None:
            holdout = float(forest.score(data.x_holdout, data.y_holdout))
        nodes = sum(int(tree.tree_.node_count) for tree in forest.estimators_)
        self.forest = Baseline(name=FOREST, n_estimators=FOREST_TREES, accuracy=test_accuracy,
                               seconds=seconds)
        self._finished(Point(
            model=FOREST, hidden_units=None, hidden_layers=None, parameters=nodes, epochs=None,
            train_seconds=seconds, epoch_seconds=None, holdout_accuracy=holdout, test_accuracy=test_accuracy,
            test_loss=None, inference="scikit-learn"))

    def _publish(self) -> None:
        assert self._best is not None and self._data is not None  # every grid has a network
        point, trained = self._best
        logger.info("publishing the best point, %s (hold-out accuracy %s), as the next version of %s",
                    point.label, percent(point.holdout_accuracy or 0.0), self.train_config.name)
        self.published = publish(self.train_config, trained, self._data, baseline=self.forest,
                                 sweep_page=render_page(self.document(), self._figures()))
        self.published["point"] = point.label
        self.write(page=False)  # the JSON names the version; the page (copied into it) stays

    def settings(self) -> dict[str, Any]:
        """What every point shares, for the JSON and the page."""
        data = self._data
        return {
            "data_dir": str(Path(self.config.data_dir).resolve()), "base_preset": BASE_PRESET,
            "units": list(self.config.units), "layers": list(self.config.layers),
            "epochs": self.base.epochs, "batch_size": self.base.batch_size, "optimizer": self.base.optimizer,
            "learning_rate": self.base.learning_rate, "holdout_fraction": self.base.holdout_fraction,
            "seed": self.config.seed, "forest": self.config.forest, "forest_trees": FOREST_TREES,
            "train_size": None if data is None else int(data.x_train.shape[0]),
            "holdout_size": None if data is None or data.x_holdout is None else int(data.x_holdout.shape[0]),
            "test_size": None if data is None else int(data.x_test.shape[0]),
            "labels": LABELS, "started_at": self.started_at,
        }

    def document(self) -> dict[str, Any]:
        """sweep.json's content: the settings, the finished points, the best, the answers."""
        best = best_network(self.points)
        return {
            "settings": self.settings(), "planned": self.planned, "finished": len(self.points),
            "complete": len(self.points) == self.planned,
            "points": [point.to_json() for point in self.points],
            "best": None if best is None else best.label,
            "answers": [{"question": q, "answer": a} for q, a in answers(self.points)],
            "files": {key: str(path) for key, path in self.files.items()},
            "published": self.published,
        }

    def _figures(self) -> dict[str, bytes]:
        files = self.files
        return {"units_plot": files["units_plot"].read_bytes(), "time_plot": files["time_plot"].read_bytes()}

    def write(self, page: bool = True) -> None:
        """Writes sweep.json and sweep.csv with the finished points, then (``page``) the plots and
        sweep.html; each file replaced whole."""
        files = self.files
        document = self.document()
        _write_atomically(files["json"], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        _write_atomically(files["csv"], to_csv(self.points))
        if page:
            _write_atomically(files["units_plot"], plot_accuracy_by_units(self.points))
            _write_atomically(files["time_plot"], plot_accuracy_by_time(self.points))
            _write_atomically(files["page"], render_page(document, self._figures()))
        self.written = len(self.points)
