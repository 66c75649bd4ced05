"""Plots shared by the trainer's report and the client (matplotlib, imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

_DPI = 100


def plot_confusion_matrix(path: Path, cm: npt.NDArray[np.integer[Any]] | Sequence[Sequence[int]],
                          labels: Sequence[str], *, title: str) -> None:
    """The tutorial's plot (scikit-learn's example): counts in the cells, true label down the side,
    predicted label along the bottom."""
    try:
        from matplotlib.figure import Figure  # Figure alone renders with Agg: no pyplot, no display
    except ImportError as exc:  # the client has matplotlib only with the [plot] extra
        raise RuntimeError("plotting needs matplotlib: pip install 'digitserve[plot]'") from exc
    cm = np.asarray(cm)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = max(5.0, 0.55 * len(labels) + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(cm, interpolation="nearest", cmap="Blues")
    fig.colorbar(image, ax=ax)
    total, correct = int(cm.sum()), int(np.trace(cm))
    accuracy = correct / total if total else 0.0
    ax.set_title(f"{title}\nconfusion matrix: {correct}/{total} correct ({accuracy:.2%})")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, list(labels), rotation=45)
    ax.set_yticks(ticks, list(labels))
    threshold = cm.max() / 2.0 if cm.size else 0.0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, format(int(cm[i, j]), "d"), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    ax.set_ylabel("True label")
    ax.set_xlabel("Predicted label")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
