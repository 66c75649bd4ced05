"""The sweep's page: its two plots (matplotlib's Figure, no pyplot), the tutorial's three questions
answered in one sentence each from the measured points, and the table, as one HTML page."""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure  # Figure alone renders with Agg: no pyplot, no display

from digitserve.trainer.htmlparts import STYLE, figure, table
from digitserve.trainer.sweeptable import (
    FIELDS,
    FOREST,
    NETWORK,
    TABLE_HEADERS,
    Point,
    best_network,
    percent,
    table_cells,
)
from digitserve.trainer.train import FOREST_TREES

PAGE_FILE = "sweep.html"
UNITS_PLOT_FILE = "accuracy_by_units.png"
TIME_PLOT_FILE = "accuracy_by_time.png"
TUTORIAL_UNITS = 128  # the tutorial's one hidden layer
_DPI = 100

QUESTIONS = (
    "Tweak around with the number of neurons in the hidden layer. Can you increase the accuracy?",
    "Try to add more layers. Does the neural network train slower? Can you think of why?",
    "Try to train a Random Forest classifier instead of a Neural Network. Is the accuracy better?",
)


def _layers(count: int) -> str:
    return f"{count} hidden layer" + ("" if count == 1 else "s")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def plot_accuracy_by_units(points: Sequence[Point]) -> bytes:
    """Test accuracy against hidden units (log-2 axis), a line per layer count, the forest a
    horizontal line: the PNG's bytes."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot(1, 1, 1)
    networks = [p for p in points if p.model == NETWORK]
    for index, layers in enumerate(sorted({p.hidden_layers for p in networks if p.hidden_layers})):
        line = sorted((p for p in networks if p.hidden_layers == layers), key=lambda p: p.hidden_units or 0)
        ax.plot([p.hidden_units or 0 for p in line], [100 * p.test_accuracy for p in line], "o-",
                color=f"C{index}", label=_layers(layers))
    for forest in (p for p in points if p.model == FOREST):
        ax.axhline(100 * forest.test_accuracy, color="black", linestyle="--",
                   label=f"random forest ({percent(forest.test_accuracy)})")
    units = sorted({p.hidden_units for p in networks if p.hidden_units})
    if units:
        ax.set_xscale("log", base=2)
        ax.set_xticks(units, [str(u) for u in units])
        ax.minorticks_off()
    ax.set_xlabel("hidden units per layer")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against hidden units")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def plot_accuracy_by_time(points: Sequence[Point]) -> bytes:
    """Test accuracy against training time (log axis), each point labelled: the PNG's bytes."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot(1, 1, 1)
    layer_counts = sorted({p.hidden_layers for p in points if p.hidden_layers})
    for index, layers in enumerate(layer_counts):
        group = [p for p in points if p.model == NETWORK and p.hidden_layers == layers]
        ax.scatter([p.train_seconds for p in group], [100 * p.test_accuracy for p in group],
                   color=f"C{index}", label=_layers(layers), zorder=3)
    forests = [p for p in points if p.model == FOREST]
    if forests:
        ax.scatter([p.train_seconds for p in forests], [100 * p.test_accuracy for p in forests],
                   color="black", marker="s", label="random forest", zorder=3)
    for point in points:
        ax.annotate(point.label, (point.train_seconds, 100 * point.test_accuracy), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    if points:
        ax.set_xscale("log")
        ticks = _log_ticks(min(p.train_seconds for p in points), max(p.train_seconds for p in points))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against training time")
    ax.grid(True, alpha=0.3, which="both")
    if ax.has_data():
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def _log_ticks(low: float, high: float) -> list[float]:
    """Round values (1, 2, 5 times a power of ten; finer within one decade) from ``low`` to
    ``high``, for a log axis labelled in plain numbers."""
    low, high = max(low, 1e-3), max(high, 1e-3)
    decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [round(k * 10.0**e, 6) for e in decades for k in steps
                 if low * 0.9 <= k * 10.0**e <= high * 1.1]
        if len(ticks) >= 3:
            return ticks
    return ticks


def answer_units(points: Sequence[Point]) -> str:
    """Question 1, from the networks of one hidden layer (else of the fewest layers measured):
    the most accurate unit count against the tutorial's 128 (else the fewest units measured)."""
    networks = [p for p in points if p.model == NETWORK]
    if not networks:
        return "Not measured yet: no network has finished."
    layers = min(p.hidden_layers or 0 for p in networks)
    row = sorted((p for p in networks if p.hidden_layers == layers), key=lambda p: p.hidden_units or 0)
    if len(row) < 2:
        return (f"Not measured: only {row[0].hidden_units} units finished with {_layers(layers)}; "
                "the sweep needs at least two unit counts (--units).")
    best = max(row, key=lambda p: (p.test_accuracy, -p.parameters))
    reference = next((p for p in row if p.hidden_units == TUTORIAL_UNITS), row[0])
    tutorial = reference.hidden_units == TUTORIAL_UNITS
    others = [p for p in (row[0], row[-1]) if p is not best and p is not reference]
    aside = [f"{p.hidden_units} units: {percent(p.test_accuracy)}" for p in others]
    if best.test_accuracy <= reference.test_accuracy and reference is row[-1]:
        figures = "; ".join(f"{p.hidden_units} units: {percent(p.test_accuracy)}" for p in row[:-1])
        return (f"Not measured above the tutorial's {reference.hidden_units}, the most units of the sweep: "
                f"with {_layers(layers)}, it reached {percent(reference.test_accuracy)} test accuracy, "
                f"fewer did worse ({figures}); try larger --units.")
    if best.test_accuracy <= reference.test_accuracy:
        named = ("the tutorial's 128 units were" if tutorial
                 else f"the fewest units measured, {reference.hidden_units}, were")
        figures = "; ".join([f"{percent(reference.test_accuracy)} test accuracy", *aside])
        return f"No: with {_layers(layers)}, {named} the most accurate ({figures})."
    named = "the tutorial's 128" if tutorial else f"{reference.hidden_units}, the fewest measured"
    more = f" ({'; '.join(aside)})" if aside else ""
    return (f"Yes: with {_layers(layers)}, {best.hidden_units} units reached "
            f"{percent(best.test_accuracy)} test accuracy against {percent(reference.test_accuracy)} "
            f"for {named}{more}.")


def answer_layers(points: Sequence[Point]) -> str:
    """Question 2: the time per epoch of the most layers against the fewest, at the tutorial's
    128 units (else the most units measured at both), and why: the parameters each layer adds."""
    networks = [p for p in points if p.model == NETWORK]
    counts = sorted({p.hidden_layers or 0 for p in networks})
    if len(counts) < 2:
        return "Not measured: the sweep needs at least two layer counts (--layers)."
    fewest, most = counts[0], counts[-1]
    at = {(p.hidden_units, p.hidden_layers): p for p in networks}
    both = sorted(u for u, n in at if n == fewest and (u, most) in at and u is not None)
    if not both:
        return f"Not measured: no unit count finished with both {fewest} and {most} hidden layers."
    units = TUTORIAL_UNITS if TUTORIAL_UNITS in both else both[-1]
    low, high = at[(units, fewest)], at[(units, most)]
    assert low.epoch_seconds is not None and high.epoch_seconds is not None
    ratio = high.epoch_seconds / low.epoch_seconds
    added = high.parameters - low.parameters
    ratios = [at[(u, most)].epoch_seconds / at[(u, fewest)].epoch_seconds  # type: ignore[operator]
              for u in both]
    spread = (f"; {min(ratios):.2f}× to {max(ratios):.2f}× over the {len(both)} unit counts measured "
              "with both" if len(both) > 1 else "")
    took = (f"at {units} units, {_layers(most)} took {ratio:.2f}× the time per epoch of {fewest} "
            f"({high.epoch_seconds:.2f} s against {low.epoch_seconds:.2f} s{spread})")
    accuracy = (f"the deeper network's test accuracy: {percent(high.test_accuracy)} against "
                f"{percent(low.test_accuracy)}")
    if ratio >= 1.1:
        return (f"Yes: {took}, because each added layer is a {units}×{units} weight matrix and {units} "
                f"biases, {added:,} more parameters in all ({low.parameters:,} → {high.parameters:,}, "
                f"{high.parameters / low.parameters:.2f}×), multiplied forward and updated backward for "
                f"every image of every epoch; {accuracy}.")
    return (f"Not measurably: {took}: the added layers bring only {added:,} parameters to the "
            f"{low.parameters:,} of {fewest} ({added / low.parameters:+.1%}), too little work to show "
            f"in the time; {accuracy}.")


def answer_forest(points: Sequence[Point]) -> str:
    """Question 3: the forest's test accuracy against the most accurate network's and the
    tutorial's (128 units, 1 layer) where measured."""
    forests = [p for p in points if p.model == FOREST]
    networks = [p for p in points if p.model == NETWORK]
    if not forests:
        return "Not measured: the sweep ran with --no-forest, or stopped before the forest."
    forest = forests[0]
    if not networks:
        return f"The Random Forest reached {percent(forest.test_accuracy)}; no network finished to compare."
    best = max(networks, key=lambda p: (p.test_accuracy, -p.parameters))
    tutorial = next((p for p in networks if (p.hidden_units, p.hidden_layers) == (TUTORIAL_UNITS, 1)), None)
    beaten = sum(p.test_accuracy < forest.test_accuracy for p in networks)
    reached = (f"the Random Forest ({FOREST_TREES} trees) reached {percent(forest.test_accuracy)} "
               f"test accuracy (fitted in {forest.train_seconds:.1f} s)")
    best_text = f"{best.label}: {percent(best.test_accuracy)} in {best.train_seconds:.1f} s"
    tally = f"; it beat {beaten} of the {len(networks)} networks"
    if forest.test_accuracy > best.test_accuracy:
        return f"Yes: {reached}, above every network of the sweep (the best, {best_text})."
    if tutorial is not None and forest.test_accuracy > tutorial.test_accuracy:
        return (f"Better than the tutorial's network, not than the best: {reached}, against "
                f"{percent(tutorial.test_accuracy)} for the tutorial's 128 units × 1 layer but "
                f"{percent(best.test_accuracy)} for the best network ({best.label}, "
                f"{best.train_seconds:.1f} s){tally}.")
    tutorial_text = ("" if tutorial is None or tutorial is best
                     else f", nor the tutorial's 128×1 ({percent(tutorial.test_accuracy)})")
    return f"No: {reached}, not above the best network ({best_text}){tutorial_text}{tally}."


def answers(points: Sequence[Point]) -> list[tuple[str, str]]:
    """The tutorial's three questions, each with its answer from ``points``."""
    return list(zip(QUESTIONS, (answer_units(points), answer_layers(points), answer_forest(points)),
                    strict=True))


def points_of(document: Mapping[str, Any]) -> list[Point]:
    """The points of a sweep.json document."""
    return [Point(**{name: entry[name] for name in FIELDS}) for entry in document["points"]]


def render_page(document: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """sweep.html: the answers, the two plots (``figures``' ``units_plot`` and ``time_plot``, as
    data URIs) and the table of ``document`` (sweep.json's content)."""
    settings = document["settings"]
    points = points_of(document)
    best = best_network(points)
    facts = [f"started {settings['started_at']}", f"data {settings['data_dir']}",
             f"{settings['train_size']} training images, {settings['holdout_size']} held out, "
             f"{settings['test_size']} test images",
             f"{settings['optimizer'].upper()} (learning rate {settings['learning_rate']}), "
             f"{settings['epochs']} epochs, batch {settings['batch_size']}, seed {settings['seed']}"]
    progress = ("" if document["complete"] else
                f"<p><strong>{document['finished']} of {document['planned']} points finished</strong> "
                "(the sweep was interrupted or is still running).</p>")
    parts = ["<h1>mnist-train sweep: the tutorial's three questions</h1>",
             f'<p class="meta">{html.escape(" · ".join(facts))}</p>', progress,
             "<h2>The answers, from the figures below</h2>", "<ol>"]
    for entry in document["answers"]:
        parts.append(f'<li><p><em>{html.escape(entry["question"])}</em></p>'
                     f'<p class="answer">{html.escape(entry["answer"])}</p></li>')
    parts += ["</ol>", "<h2>Test accuracy against hidden units</h2>",
              figure(figures.get("units_plot"), "test accuracy against hidden units"),
              "<h2>Test accuracy against training time</h2>",
              figure(figures.get("time_plot"), "test accuracy against training time"),
              "<h2>Every point</h2>",
              table(TABLE_HEADERS, [table_cells(p) for p in points],
                     ["best" if p is best else "" for p in points]),
              "<p>Accuracies: a network's as the server's Evaluate computes them (the path it would "
              "serve, LiteRT where it agrees with Keras, in batches of 1000 images), the forest's by "
              "scikit-learn; hold-out: the training images set aside by the split. In bold, the best "
              "network by hold-out accuracy (ties: test accuracy, then fewer parameters), the one "
              "<code>--publish-best</code> publishes. Parameters: a network's weights and biases "
              "(count_params); for the forest, the nodes of its trees. Training time: fit's, with the "
              "hold-out figures after each epoch for a network.</p>"]
    body = "\n".join(part for part in parts if part)
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>mnist-train sweep</title><style>{STYLE}</style></head>"
            f"<body>\n{body}\n</body></html>\n")
