"""The training report: confusion matrix, training curves and sample predictions as PNG files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure  # Figure alone renders with Agg: no pyplot, no display
from matplotlib.ticker import MaxNLocator

from digitserve.plots import plot_confusion_matrix

CONFUSION_MATRIX_FILE = "confusion_matrix.png"
TRAINING_CURVES_FILE = "training_curves.png"
SAMPLES_FILE = "samples.png"
_DPI = 100


def write_report(
    report_dir: Path,
    *,
    title: str,
    labels: Sequence[str],
    confusion_matrix: Sequence[Sequence[int]],
    history: Mapping[str, Sequence[float]],
    images: npt.NDArray[np.uint8],
    y_true: npt.NDArray[np.integer[Any]],
    y_pred: npt.NDArray[np.integer[Any]],
) -> list[Path]:
    """Writes the three report figures into ``report_dir`` (created) and returns their paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        report_dir / CONFUSION_MATRIX_FILE,
        report_dir / TRAINING_CURVES_FILE,
        report_dir / SAMPLES_FILE,
    ]
    plot_confusion_matrix(paths[0], np.asarray(confusion_matrix), labels, title=title)
    plot_training_curves(paths[1], history, title=title)
    plot_samples(paths[2], images, y_true, y_pred, labels, title=title)
    return paths


def plot_training_curves(path: Path, history: Mapping[str, Sequence[float]], *, title: str) -> None:
    """Loss and accuracy per epoch, for training and (when recorded) validation."""
    fig = Figure(figsize=(10, 4))
    for position, metric in enumerate(("loss", "accuracy"), start=1):
        ax = fig.add_subplot(1, 2, position)
        for key, label, style in ((metric, "train", "o-"), (f"val_{metric}", "validation", "s--")):
            values = history.get(key)
            if values:
                epochs = np.arange(1, len(values) + 1)
                ax.plot(epochs, values, style, label=label)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title}: training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)


def plot_samples(
    path: Path,
    images: npt.NDArray[np.uint8],
    y_true: npt.NDArray[np.integer[Any]],
    y_pred: npt.NDArray[np.integer[Any]],
    labels: Sequence[str],
    *,
    title: str,
    rows: int = 5,
    cols: int = 8,
) -> None:
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
        ax.set_title(
            f"#{index}: {labels[y_pred[index]]} (true {labels[y_true[index]]})",
            fontsize=7, color="red" if mistake else "black",
        )
        if mistake:
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{title}: predicted (true) label; {len(wrong)} of {len(y_true)} misclassified, "
        f"first {len(shown_wrong)} in red"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
