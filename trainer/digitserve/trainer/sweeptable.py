"""The sweep's points: ``Point`` (a row of its table), the best of them, and the table as the
terminal shows it and as CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

NETWORK = "network"
FOREST = "random-forest"


@dataclass(frozen=True)
class Point:
    """One measured point: a row of the table. A network's accuracies are computed as the
    server's Evaluate computes them (``train.measure``); the forest's by scikit-learn."""

    model: str  # ``network`` or ``random-forest``
    hidden_units: int | None  # per hidden layer (networks)
    hidden_layers: int | None
    parameters: int  # the network's count_params(); the forest's tree nodes, all trees together
    epochs: int | None
    train_seconds: float  # fit's (networks: with the per-epoch hold-out figures)
    epoch_seconds: float | None  # train_seconds / epochs
    holdout_accuracy: float | None
    test_accuracy: float  # on the official test images
    test_loss: float | None  # mean cross-entropy (networks)
    inference: str  # ``litert`` or ``tensorflow`` (the path the server would serve), ``scikit-learn``

    @property
    def label(self) -> str:
        """``128×1`` (units × layers), or ``random forest``."""
        if self.model == FOREST:
            return "random forest"
        return f"{self.hidden_units}×{self.hidden_layers}"

    def to_json(self) -> dict[str, Any]:
        """sweep.json's entry: the label, then every field."""
        return {"label": self.label, **dataclasses.asdict(self)}


FIELDS = [field.name for field in dataclasses.fields(Point)]


def best_network(points: Sequence[Point]) -> Point | None:
    """The network ``--publish-best`` publishes: the highest hold-out accuracy (chosen without
    looking at the test set), ties to the higher test accuracy, then to fewer parameters."""
    networks = [p for p in points if p.model == NETWORK]
    if not networks:
        return None
    return max(networks, key=lambda p: (p.holdout_accuracy or 0.0, p.test_accuracy, -p.parameters))


# The terminal table: (header, width, the cell of a point).
_COLUMNS: list[tuple[str, int, Callable[[Point], str]]] = [
    ("point", 13, lambda p: p.label),
    ("layers", 6, lambda p: "-" if p.hidden_layers is None else str(p.hidden_layers)),
    ("units", 5, lambda p: "-" if p.hidden_units is None else str(p.hidden_units)),
    ("parameters", 10, lambda p: f"{p.parameters:,}"),
    ("epochs", 6, lambda p: "-" if p.epochs is None else str(p.epochs)),
    ("train s", 8, lambda p: f"{p.train_seconds:.1f}"),
    ("s/epoch", 7, lambda p: "-" if p.epoch_seconds is None else f"{p.epoch_seconds:.2f}"),
    ("hold-out", 8, lambda p: "-" if p.holdout_accuracy is None else percent(p.holdout_accuracy)),
    ("test", 8, lambda p: percent(p.test_accuracy)),
]


def percent(fraction: float) -> str:
    """0.9791 -> ``97.91 %`` (a hundredth of a percent is one of MNIST's 10,000 test images)."""
    return f"{100 * fraction:.2f} %"


def table_header() -> str:
    """The terminal table's header line."""
    return "  ".join(name.ljust(width) if i == 0 else name.rjust(width)
                     for i, (name, width, _) in enumerate(_COLUMNS)).rstrip()


def table_row(point: Point) -> str:
    """One point as a line of the terminal table, aligned under ``table_header``."""
    return "  ".join(cell(point).ljust(width) if i == 0 else cell(point).rjust(width)
                     for i, (_, width, cell) in enumerate(_COLUMNS)).rstrip()


def table_cells(point: Point) -> list[str]:
    """The cells of ``table_row`` (for the page's table)."""
    return [cell(point) for _, _, cell in _COLUMNS]


TABLE_HEADERS = [name for name, _, _ in _COLUMNS]


def to_csv(points: Sequence[Point]) -> str:
    """The points as CSV: a header of the field names, then a row per point (empty: no value)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["label", *FIELDS])
    for point in points:
        writer.writerow([point.label, *("" if value is None else value
                                        for value in dataclasses.astuple(point))])
    return stream.getvalue()
