"""Client-side plots: the evaluated confusion matrix."""

from __future__ import annotations

from pathlib import Path

from client.client import EvaluateResult
from digitserve.plots import plot_confusion_matrix as _plot_matrix


def plot_confusion_matrix(result: EvaluateResult, path: Path) -> Path:
    _plot_matrix(path, result.confusion_matrix, result.labels,
                 title=f"{result.model_name} v{result.model_version}, evaluated by mnist-client")
    return path
