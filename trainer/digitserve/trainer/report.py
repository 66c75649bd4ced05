"""The training report: confusion matrix, training curves and sample predictions as PNG files, and
all of it with the figures from the metadata on one self-contained HTML page (index.html)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure  # Figure alone renders with Agg: no pyplot, no display
from matplotlib.ticker import MaxNLocator

from digitserve.metadata import DataInfo, Metadata, Metrics
from digitserve.plots import plot_confusion_matrix
from digitserve.trainer.htmlparts import STYLE as _STYLE
from digitserve.trainer.htmlparts import figure as _figure
from digitserve.trainer.htmlparts import table as _table

CONFUSION_MATRIX_FILE = "confusion_matrix.png"
TRAINING_CURVES_FILE = "training_curves.png"
SAMPLES_FILE = "samples.png"
HTML_FILE = "index.html"
SWEEP_FILE = "sweep.html"  # the page of the sweep whose best point a version is (mnist-train sweep)
_DPI = 100


def write_report(report_dir: Path, *, title: str, labels: Sequence[str],
                 confusion_matrix: Sequence[Sequence[int]], history: Mapping[str, Sequence[float]],
                 images: npt.NDArray[np.uint8], y_true: npt.NDArray[np.integer[Any]],
                 y_pred: npt.NDArray[np.integer[Any]], metadata: Metadata | Mapping[str, Any] | None = None,
                 sweep_page: str | None = None) -> list[Path]:
    """Writes the three report figures and the HTML page that shows them with the figures of
    ``metadata`` (metrics, baseline, hyper-parameters) into ``report_dir``, and ``sweep_page`` (the
    HTML of the sweep the version is the best point of) as ``sweep.html``, linked from the page;
    returns their paths, the page last."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = [report_dir / name for name in (CONFUSION_MATRIX_FILE, TRAINING_CURVES_FILE, SAMPLES_FILE)]
    plot_confusion_matrix(paths[0], np.asarray(confusion_matrix), labels, title=title)
    plot_training_curves(paths[1], history, title=title)
    plot_samples(paths[2], images, y_true, y_pred, labels, title=title)
    if metadata is not None and not isinstance(metadata, Metadata):
        metadata = Metadata.from_json(metadata, "the report's metadata")
    figures = {p.name: p.read_bytes() for p in paths}
    if sweep_page is not None:
        paths.append(report_dir / SWEEP_FILE)
        paths[-1].write_text(sweep_page, encoding="utf-8")
    page = report_dir / HTML_FILE
    page.write_text(render_html(title=title, labels=labels, confusion_matrix=confusion_matrix,
                                figures=figures, metadata=metadata,
                                sweep_link=SWEEP_FILE if sweep_page is not None else None),
                    encoding="utf-8")
    return [*paths, page]


def plot_training_curves(path: Path, history: Mapping[str, Sequence[float]], *, title: str) -> None:
    """Loss and accuracy per epoch, for training and (when recorded) validation."""
    fig = Figure(figsize=(10, 4))
    for position, metric in enumerate(("loss", "accuracy"), start=1):
        ax = fig.add_subplot(1, 2, position)
        for key, label, style in ((metric, "train", "o-"), (f"val_{metric}", "validation", "s--")):
            if values := history.get(key):
                ax.plot(np.arange(1, len(values) + 1), values, style, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title}: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def plot_samples(path: Path, images: npt.NDArray[np.uint8], y_true: npt.NDArray[np.integer[Any]],
                 y_pred: npt.NDArray[np.integer[Any]], labels: Sequence[str], *, title: str, rows: int = 5,
                 cols: int = 8) -> None:
    """A grid of test images (``images`` of shape (N, rows, cols)) with predicted and true labels:
    the first mistakes (in red, at most half the grid), then the first correctly classified ones."""
    cells = rows * cols
    wrong = np.flatnonzero(y_true != y_pred)
    right = np.flatnonzero(y_true == y_pred)
    shown_wrong = wrong[: cells // 2]
    shown = np.concatenate([shown_wrong, right[: cells - len(shown_wrong)]])
    if len(shown) < cells:  # few correct ones: fill with more mistakes
        extra = wrong[len(shown_wrong) : len(shown_wrong) + cells - len(shown)]
        shown = np.concatenate([shown, extra])
    fig = Figure(figsize=(cols * 1.25, rows * 1.45 + 0.6))
    for cell, index in enumerate(shown):
        ax = fig.add_subplot(rows, cols, cell + 1)
        ax.imshow(images[index], cmap="gray_r", vmin=0, vmax=255)
        mistake = y_true[index] != y_pred[index]
        ax.set_title(f"#{index}: {labels[y_pred[index]]} (true {labels[y_true[index]]})", fontsize=7,
                     color="red" if mistake else "black")
        if mistake:
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: predicted (true) label; {len(wrong)} of {len(y_true)} misclassified, "
                 f"first {len(shown_wrong)} in red")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def most_confused_pairs(cm: npt.NDArray[np.integer[Any]] | Sequence[Sequence[int]], labels: Sequence[str],
                        k: int = 10) -> list[tuple[str, str, int, float]]:
    """The ``k`` largest non-zero off-diagonal cells (rows = true class) as (true label, predicted
    label, count, share of the true class's images), largest first."""
    matrix = np.asarray(cm, dtype=np.int64)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    rows, cols = np.nonzero(off)
    order = sorted(zip(rows.tolist(), cols.tolist(), strict=True), key=lambda rc: (-off[rc], rc))
    support = matrix.sum(axis=1)
    return [(labels[i], labels[j], int(off[i, j]), float(off[i, j] / support[i]) if support[i] else 0.0)
            for i, j in order[:k]]


def _pct(x: Any) -> str:
    return f"{100 * float(x):.2f} %"


def render_html(*, title: str, labels: Sequence[str], confusion_matrix: Sequence[Sequence[int]],
                figures: Mapping[str, bytes], metadata: Metadata | None, top_pairs: int = 10,
                sweep_link: str | None = None) -> str:
    """The report as one HTML page, the PNG ``figures`` (by file name) embedded as data URIs;
    ``sweep_link``, the address of the page of the sweep this model is the best point of."""
    meta = metadata or Metadata(name="", version=0)
    metrics = meta.metrics or Metrics()
    data = meta.data or DataInfo()
    cm = np.asarray(confusion_matrix, dtype=np.int64)
    total, correct = int(cm.sum()), int(np.trace(cm))
    accuracy = (correct / total if total else 0.0) if metrics.test_accuracy is None else metrics.test_accuracy
    trained = f"{meta.train_seconds:.1f} s" if meta.train_seconds is not None else ""
    facts = [f"created {meta.created_at}" if meta.created_at is not None else "",
             f"preset {meta.preset}" if meta.preset is not None else "",
             f"seed {meta.seed}" if meta.seed is not None else "",
             f"{data.train_size} training images" if data.train_size is not None else "",
             f"trained in {trained}" if trained else ""]
    summary: list[tuple[str, str]] = [("test accuracy", _pct(accuracy)),
                                      ("test images misclassified", f"{total - correct} of {total}")]
    if metrics.test_loss is not None:
        summary.append(("test loss (mean cross-entropy)", f"{metrics.test_loss:.4f}"))
    if metrics.holdout_accuracy is not None:
        summary.append(("hold-out accuracy", _pct(metrics.holdout_accuracy)))
        if metrics.holdout_loss is not None:
            summary.append(("hold-out loss", f"{metrics.holdout_loss:.4f}"))
    check = meta.check_set
    if check is not None and check.accuracy is not None:
        count = "?" if check.count is None else check.count
        summary.append((f"check-set accuracy ({count} images, the server's gate)", _pct(check.accuracy)))
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">{html.escape(" · ".join(f for f in facts if f))}</p>',
             "<h2>Summary</h2>", _table(("", "value"), summary)]
    if sweep_link is not None:
        parts.append('<p class="sweep">This model is the best point of a sweep of the tutorial\'s network '
                     "(<code>mnist-train sweep --publish-best</code>): "
                     f'<a href="{html.escape(sweep_link)}">the sweep\'s page</a>, its table, plots and the '
                     "tutorial's three questions answered.</p>")
    if (baseline := metrics.baseline) is not None:
        name = baseline.name
        trees = "?" if baseline.n_estimators is None else baseline.n_estimators
        rows = [(f"network ({meta.preset or ''})", _pct(accuracy), total - correct, trained),
                (name, _pct(baseline.accuracy), round(total * (1 - baseline.accuracy)),
                 f"{baseline.seconds or 0.0:.1f} s")]
        better = 0 if accuracy >= baseline.accuracy else 1
        parts += [f"<h2>Compared with the baseline: {html.escape(name)}</h2>",
                  "<p>The tutorial's take-home exercise: a scikit-learn random forest "
                  f"({trees} trees) fitted on the same training pixels and scored "
                  "on the same test images.</p>" if name == "random-forest" else "",
                  _table(("model", "test accuracy", "test errors", "fit time"), rows,
                         ["best" if i == better else "" for i in range(2)])]
    parts += ["<h2>Training curves</h2>", _figure(figures.get(TRAINING_CURVES_FILE), "training curves")]
    pairs = most_confused_pairs(cm, labels, top_pairs)
    pair_rows = [(f"{t} → {p}", count, _pct(share)) for t, p, count, share in pairs]
    parts += ["<h2>Confusion matrix</h2>", '<div class="cols">',
              _figure(figures.get(CONFUSION_MATRIX_FILE), "confusion matrix"),
              "<div><h3>Most confused pairs</h3>",
              _table(("true → predicted", "images", "of the true class"), pair_rows)
              if pair_rows else "<p>No test image was misclassified.</p>",
              "</div></div>"]
    if per_class := metrics.per_class:
        parts += ["<h2>Per class</h2>", _table(("class", "precision", "recall", "F1", "support"), [
            (c.label, f"{c.precision:.4f}", f"{c.recall:.4f}", f"{c.f1:.4f}", c.support) for c in per_class])]
    parts += ["<h2>Sample predictions</h2>", _figure(figures.get(SAMPLES_FILE), "sample predictions")]
    details: list[tuple[str, Mapping[str, Any] | None]] = [("hyper-parameters", meta.hyperparameters),
                                                           ("libraries", meta.versions)]
    for heading, mapping in details:
        if mapping:
            parts += [f"<h2>{heading.capitalize()}</h2>", _table(("", "value"), sorted(mapping.items()))]
    body = "\n".join(parts)
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}: training report</title><style>{_STYLE}</style></head>"
            f"<body>\n{body}\n</body></html>\n")
