"""Client-side plots: the evaluated confusion matrix."""

from __future__ import annotations

from pathlib import Path

from client.client import EvaluateResult
from digitserve.plots import plot_confusion_matrix as _plot_matrix


def plot_confusion_matrix(result: EvaluateResult, path: Path) -> Path:
    title = (f"Confusion matrix: {result.model_name} v{result.model_version}, "
             f"{result.count} images, accuracy {result.accuracy:.2%}")
    return _plot_matrix(result.confusion_matrix, result.labels, path, title)
