"""Reports people look at: the trainer's one-page HTML report and the load-test plot."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from tests.support import require_module

# The report and the plots draw with matplotlib (the trainer's and the plot extras).
require_module("matplotlib", "the plot and trainer extras: pip install -e '.[plot,trainer]'",
               allow_module_level=True)

from digitserve.client.plots import plot_loadtest  # noqa: E402  (matplotlib checked above)
from digitserve.trainer.report import HTML_FILE, most_confused_pairs, write_report  # noqa: E402

LABELS = [str(d) for d in range(10)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Collects the images, the table rows and the headings of a page; checks tags balance."""

    VOID: ClassVar[set[str]] = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.headings: list[str] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag in self.VOID:
            return
        self.stack.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th", "h2"):
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()
        if tag in ("td", "th") and self._text is not None:
            self.rows[-1].append("".join(self._text))
        if tag == "h2" and self._text is not None:
            self.headings.append("".join(self._text))
        if tag in ("td", "th", "h2"):
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def _confusion() -> np.ndarray:
    cm = np.diag(np.full(10, 90)).astype(np.int64)
    cm[4, 9] = 7  # 4 read as 9: the worst
    cm[9, 4] = 5
    cm[3, 5] = 5  # ties with 9 -> 4: (3, 5) comes first
    cm[7, 1] = 1
    return cm


def test_most_confused_pairs_are_the_largest_off_diagonal_cells() -> None:
    cm = _confusion()
    assert most_confused_pairs(cm, LABELS, k=3) == [
        ("4", "9", 7, 7 / 97), ("3", "5", 5, 5 / 95), ("9", "4", 5, 5 / 95)]
    assert len(most_confused_pairs(cm, LABELS)) == 4  # only cells with mistakes
    assert most_confused_pairs(np.diag(np.ones(10, np.int64)), LABELS) == []


def _metadata(baseline: bool) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "test_accuracy": 0.9812, "test_loss": 0.0634,
        "per_class": [{"label": k, "precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 97}
                      for k in LABELS],
    }
    if baseline:
        metrics["baseline"] = {"name": "random-forest", "n_estimators": 100, "accuracy": 0.9691,
                               "seconds": 41.5}
    return {"name": "mnist", "version": 3, "preset": "default", "seed": 42, "train_seconds": 63.2,
            "created_at": "2026-01-02T03:04:05Z", "data": {"train_size": 60000, "test_size": 10000},
            "metrics": metrics, "check_set": {"count": 500, "accuracy": 0.99},
            "hyperparameters": {"epochs": 3, "batch_size": 128}, "versions": {"keras": "3.0"}}


@pytest.mark.parametrize("baseline", [True, False])
def test_html_report_is_one_self_contained_page(tmp_path: Path, baseline: bool) -> None:
    rng = np.random.default_rng(0)
    cm = _confusion()
    y_true = rng.integers(0, 10, 40)
    y_pred = np.where(rng.random(40) < 0.8, y_true, (y_true + 1) % 10)
    paths = write_report(
        tmp_path / "report", title="mnist v3 <default>", labels=LABELS, confusion_matrix=cm.tolist(),
        history={"loss": [0.5, 0.2, 0.1], "accuracy": [0.8, 0.9, 0.95]},
        images=rng.integers(0, 256, (40, 28, 28)).astype(np.uint8), y_true=y_true, y_pred=y_pred,
        metadata=_metadata(baseline),
    )
    assert paths[-1] == tmp_path / "report" / HTML_FILE
    text = paths[-1].read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert page.stack == [] or page.stack == ["html"]  # every tag closed (</html> ends the feed)
    assert "mnist v3 &lt;default&gt;" in text and "<default>" not in text
    # The three PNGs are embedded, byte for byte: the page needs no other file.
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert embedded == [p.read_bytes() for p in paths if p.name == "training_curves.png"] + [
        p.read_bytes() for p in paths if p.name == "confusion_matrix.png"] + [
        p.read_bytes() for p in paths if p.name == "samples.png"]
    assert all(png.startswith(PNG_MAGIC) for png in embedded)
    assert not re.search(r'src="(?!data:)', text)
    # The most confused pairs, largest first, with their share of the true class.
    pair_rows = [r for r in page.rows if r and "→" in r[0] and r[0] != "true → predicted"]
    assert pair_rows == [["4 → 9", "7", "7.22 %"], ["3 → 5", "5", "5.26 %"], ["9 → 4", "5", "5.26 %"],
                         ["7 → 1", "1", "1.10 %"]]
    assert ["test accuracy", "98.12 %"] in page.rows
    has_baseline = any(h.startswith("Compared with the baseline") for h in page.headings)
    assert has_baseline == baseline
    if baseline:
        errors = int(cm.sum() - np.trace(cm))  # 18 of 918 test images
        assert ["network (default)", "98.12 %", str(errors), "63.2 s"] in page.rows
        assert ["random-forest", "96.91 %", str(round(918 * (1 - 0.9691))), "41.5 s"] in page.rows


def test_loadtest_plot_is_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    latencies = rng.lognormal(0.5, 0.4, 2000)
    done = np.sort(rng.uniform(0, 5, 2000))
    path = plot_loadtest(tmp_path / "plots" / "load.png", latencies, done, "2000 calls")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    empty = plot_loadtest(tmp_path / "empty.png", [], [], "nothing answered")
    assert empty.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="3 latencies but 2 completion times"):
        plot_loadtest(tmp_path / "bad.png", [1, 2, 3], [0.1, 0.2], "mismatch")
