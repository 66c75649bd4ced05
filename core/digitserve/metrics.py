"""Classification metrics computed the same way by the trainer (for the metadata) and the server
(for Evaluate), so that both report identical figures for the same predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# Keras clips probabilities to [EPSILON, 1 - EPSILON] before taking the log in its cross-entropy.
EPSILON = 1e-7


@dataclass
class ClassificationMetrics:
    """Accuracy, mean cross-entropy, confusion matrix and per-class figures of a labelled set."""

    labels: list[str]
    count: int
    accuracy: float
    mean_cross_entropy: float
    confusion_matrix: list[list[int]]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]

    def to_dict(self) -> dict[str, Any]:
        per_class = zip(self.labels, self.precision, self.recall, self.f1, self.support, strict=True)
        return {"count": self.count, "accuracy": self.accuracy, "mean_cross_entropy": self.mean_cross_entropy,
                "confusion_matrix": self.confusion_matrix,
                "per_class": [{"label": lab, "precision": p, "recall": r, "f1": f, "support": s}
                              for lab, p, r, f, s in per_class]}


@dataclass
class MetricsAccumulator:
    """Accumulates batches of (true class indices, probabilities) into ClassificationMetrics."""

    labels: list[str]
    _confusion: npt.NDArray[np.int64] = field(init=False)
    _loss_sum: float = field(init=False, default=0.0)
    _count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._confusion = np.zeros((len(self.labels),) * 2, dtype=np.int64)

    @property
    def count(self) -> int:
        return self._count

    def update(self, y_true: npt.NDArray[np.integer[Any]], probs: npt.NDArray[np.floating[Any]]) -> None:
        """Adds a batch: ``y_true`` has shape (N,), ``probs`` (N, classes)."""
        n_classes = len(self.labels)
        if probs.ndim != 2 or probs.shape[1] != n_classes or probs.shape[0] != y_true.shape[0]:
            raise ValueError(f"probabilities of shape {probs.shape} do not match {y_true.shape[0]} labels "
                             f"and {n_classes} classes")
        y = y_true.astype(np.int64, copy=False)
        pred = np.argmax(probs, axis=1)
        np.add.at(self._confusion, (y, pred), 1)
        p_true = probs[np.arange(y.shape[0]), y].astype(np.float64)
        self._loss_sum += float(-np.log(np.clip(p_true, EPSILON, 1.0 - EPSILON)).sum())
        self._count += int(y.shape[0])

    def result(self) -> ClassificationMetrics:
        cm = self._confusion
        tp = np.diag(cm).astype(np.float64)
        predicted = cm.sum(axis=0).astype(np.float64)
        actual = cm.sum(axis=1).astype(np.float64)
        # A class never predicted (or never present) gets 0, as scikit-learn's zero_division=0.
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        count = self._count
        return ClassificationMetrics(
            labels=list(self.labels), count=count, accuracy=float(tp.sum() / count) if count else 0.0,
            mean_cross_entropy=self._loss_sum / count if count else 0.0, confusion_matrix=cm.tolist(),
            precision=precision.tolist(), recall=recall.tolist(), f1=f1.tolist(),
            support=actual.astype(np.int64).tolist())


def classification_metrics(labels: list[str], y_true: npt.NDArray[np.integer[Any]],
                           probs: npt.NDArray[np.floating[Any]]) -> ClassificationMetrics:
    """Metrics of one whole set at once."""
    acc = MetricsAccumulator(labels)
    acc.update(y_true, probs)
    return acc.result()
