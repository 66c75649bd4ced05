"""``mnist-train sweep`` (issue 25, item 1) on small synthetic data: the table on the terminal, in
the CSV and in the JSON say the same; the published best point's figures are the table's and the
served model's; the page's plots are real images and its answers the measured figures; a point
run again gives the same figures; Ctrl-C keeps the finished points; bad options are one line."""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from digitserve.idx import load_split
from digitserve.metadata import verify_files
from digitserve.repository import ModelRepository
from digitserve.trainer.cli import main
from digitserve.trainer.presets import build_model, get_preset
from digitserve.trainer.report import render_html
from digitserve.trainer.sweeppage import answer_forest, answer_layers, answer_units
from digitserve.trainer.sweeptable import Point
from digitserve.trainer.train import scale_images
from tests.support import REPO_ROOT

# Two unit counts × two layer counts, an epoch of batches of 16 on 450 training images.
EPOCHS = 1
GRID = ["--units", "8,16", "--layers", "1,2", "--epochs", str(EPOCHS), "--batch-size", "16"]
HEADERS = ["point", "layers", "units", "parameters", "epochs", "train s", "s/epoch", "hold-out", "test"]


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def _cells(point: dict[str, Any]) -> list[str]:
    """A JSON point as the terminal table should show it."""
    network = point["model"] == "network"
    return [f"{point['hidden_units']}×{point['hidden_layers']}" if network else "random forest",
            str(point["hidden_layers"]) if network else "-", str(point["hidden_units"]) if network else "-",
            f"{point['parameters']:,}", str(point["epochs"]) if network else "-",
            f"{point['train_seconds']:.1f}", f"{point['epoch_seconds']:.2f}" if network else "-",
            _pct(point["holdout_accuracy"]), _pct(point["test_accuracy"])]


@pytest.fixture(scope="module")
def swept(synthetic_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One sweep of GRID and the forest, its best point published: its terminal output, files
    and repository."""
    root = tmp_path_factory.mktemp("sweep")
    out, repo = root / "out", root / "repo"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["sweep", "--data-dir", str(synthetic_data_dir), "--out", str(out), *GRID,
                     "--verbose", "0", "--publish-best", "--model-repo", str(repo), "--model-name", "best"])
    assert code == 0, stdout.getvalue()
    document = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    return {"out": out, "repo": repo, "stdout": stdout.getvalue(), "document": document,
            "points": document["points"]}


def test_the_terminal_csv_and_json_tables_agree(swept: dict[str, Any]) -> None:
    points = swept["points"]
    assert [p["label"] for p in points] == ["8×1", "16×1", "8×2", "16×2", "random forest"]
    lines = swept["stdout"].splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == HEADERS
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1 : 1 + len(points)]]
    assert rows == [_cells(p) for p in points]
    assert lines[1 + len(points)] == f"best (hold-out accuracy): {swept['document']['best']}"
    with (swept["out"] / "sweep.csv").open(encoding="utf-8", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert len(table) == len(points)
    for row, point in zip(table, points, strict=True):
        for key, value in point.items():  # every figure, to the last digit (repr round-trips)
            assert row[key] == ("" if value is None else str(value)), key
    for point in points[:4]:  # the parameter count of units × layers, by hand
        units, layers = point["hidden_units"], point["hidden_layers"]
        assert point["parameters"] == _parameters(units, layers)
        assert point["epochs"] == EPOCHS
        assert point["epoch_seconds"] == pytest.approx(point["train_seconds"] / EPOCHS)
    assert swept["document"]["complete"] and swept["document"]["finished"] == 5


def test_the_published_best_point_has_the_table_s_figures(
    swept: dict[str, Any], synthetic_data_dir: Path
) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split

    from digitserve.inference import load_version, read_check_set

    document, points = swept["document"], swept["points"]
    networks = [p for p in points if p["model"] == "network"]
    best = max(networks, key=lambda p: (p["holdout_accuracy"], p["test_accuracy"], -p["parameters"]))
    assert document["best"] == best["label"]
    published = document["published"]
    assert (published["name"], published["version"], published["point"]) == ("best", 1, best["label"])
    assert f"published best version 1 ({best['label']}): {published['path']}" in swept["stdout"]
    repository = ModelRepository(swept["repo"])
    version_dir = repository.version_dir("best", 1)
    meta = repository.read_metadata("best", 1)
    assert meta["metrics"]["test_accuracy"] == best["test_accuracy"]
    assert meta["metrics"]["test_loss"] == best["test_loss"]
    assert meta["metrics"]["holdout_accuracy"] == best["holdout_accuracy"]
    hyper = meta["hyperparameters"]
    assert (hyper["hidden_units"], hyper["hidden_layers"]) == (best["hidden_units"], best["hidden_layers"])
    assert (hyper["epochs"], hyper["batch_size"], hyper["optimizer"]) == (EPOCHS, 16, "sgd")
    assert meta["train_seconds"] == best["train_seconds"]
    forest = points[-1]
    assert meta["metrics"]["baseline"] == {"name": "random-forest", "n_estimators": 100,
                                           "accuracy": forest["test_accuracy"],
                                           "seconds": forest["train_seconds"]}

    # The served model, loaded as the server loads it, predicts the test set to the same figure.
    test = load_split(synthetic_data_dir, "t10k")
    model = load_version(version_dir, check_set=read_check_set(version_dir))
    assert model.inference_path == best["inference"]
    probs = np.concatenate([model.predict(scale_images(test.images[i : i + 1000]))
                            for i in range(0, len(test.labels), 1000)])
    assert accuracy_score(test.labels, probs.argmax(axis=1)) == best["test_accuracy"]

    # The forest's figures from scikit-learn on the same split, fitted here again.
    train = load_split(synthetic_data_dir, "train")
    x_train, x_held, y_train, y_held = train_test_split(scale_images(train.images), train.labels,
                                                        test_size=0.25, random_state=42)
    oracle = RandomForestClassifier(n_estimators=100, random_state=42).fit(x_train, y_train)
    assert forest["test_accuracy"] == accuracy_score(test.labels, oracle.predict(scale_images(test.images)))
    assert forest["holdout_accuracy"] == accuracy_score(y_held, oracle.predict(x_held))
    assert forest["parameters"] == sum(tree.tree_.node_count for tree in oracle.estimators_)

    # Its report links the sweep's page, copied into it and checksummed with the rest.
    index = (version_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert '<a href="sweep.html">' in index
    assert (version_dir / "report" / "sweep.html").read_bytes() == (swept["out"] / "sweep.html").read_bytes()
    assert "report/sweep.html" in meta["report"]
    verify_files(version_dir, meta)
    assert f"report: {version_dir / 'report'}" in swept["stdout"]


def _png(data: bytes) -> np.ndarray[Any, Any]:
    from matplotlib.image import imread

    return np.asarray(imread(io.BytesIO(data), format="png"))


def _colour_pixels(image: np.ndarray[Any, Any], hex_colour: str) -> int:
    """Pixels within a few levels of ``hex_colour``."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    return int(np.sum(np.all(np.abs(image[..., :3] - rgb) < 0.03, axis=-1)))


def test_the_page_s_plots_are_images_of_the_points(swept: dict[str, Any]) -> None:
    page = (swept["out"] / "sweep.html").read_text(encoding="utf-8")
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    files = [(swept["out"] / name).read_bytes() for name in ("accuracy_by_units.png", "accuracy_by_time.png")]
    assert embedded == files
    for data in files:
        image = _png(data)
        assert image.shape == (500, 800, 4)
        assert float(image[..., :3].std()) > 0.05
        assert len(np.unique((image[..., :3] * 255).round().reshape(-1, 3), axis=0)) > 20
        # A line or mark per layer count (matplotlib's first two colours) and the forest's, black.
        assert _colour_pixels(image, "#1f77b4") > 50 and _colour_pixels(image, "#ff7f0e") > 50
        assert _colour_pixels(image, "#000000") > 200


def test_the_page_answers_the_three_questions_from_the_table(swept: dict[str, Any]) -> None:
    page = (swept["out"] / "sweep.html").read_text(encoding="utf-8")
    said = [html.unescape(a) for a in re.findall(r'<p class="answer">(.*?)</p>', page)]
    assert said == [entry["answer"] for entry in swept["document"]["answers"]]
    for answer in said:
        assert f"  {answer}" in swept["stdout"].splitlines()
    at = {(p["hidden_units"], p["hidden_layers"]): p for p in swept["points"]}
    units, layers, forest = said

    one = [at[(8, 1)], at[(16, 1)]]
    top = max(one, key=lambda p: p["test_accuracy"])
    assert _pct(top["test_accuracy"]) in units
    assert units.startswith("Yes: " if at[(16, 1)]["test_accuracy"] > at[(8, 1)]["test_accuracy"] else "No: ")

    low, high = at[(16, 1)], at[(16, 2)]  # 16: the most units measured with 1 and 2 layers
    ratio = high["epoch_seconds"] / low["epoch_seconds"]
    assert f"at 16 units, 2 hidden layers took {ratio:.2f}× the time per epoch of 1" in layers
    assert layers.startswith("Yes: " if ratio >= 1.1 else "Not measurably: ")
    added = high["parameters"] - low["parameters"]
    assert (f"{added:,} more parameters in all ({low['parameters']:,} → {high['parameters']:,}, " in layers
            if ratio >= 1.1 else f"only {added:,} parameters to the {low['parameters']:,} of 1" in layers)

    networks = [p for p in swept["points"] if p["model"] == "network"]
    best = max(networks, key=lambda p: p["test_accuracy"])
    rf = swept["points"][-1]
    assert _pct(rf["test_accuracy"]) in forest and _pct(best["test_accuracy"]) in forest
    assert forest.startswith("Yes: " if rf["test_accuracy"] > best["test_accuracy"] else "No: ")

    rows = re.findall(r"<tr(?: class=\"best\")?>(.*?)</tr>", page.split("<tbody>")[1])
    assert [re.findall(r"<td>(.*?)</td>", row) for row in rows] == [
        [html.escape(c) for c in _cells(p)] for p in swept["points"]]
    assert f'<tr class="best"><td>{swept["document"]["best"]}</td>' in page


def test_a_point_run_alone_gives_the_figures_it_had_in_the_sweep(
    swept: dict[str, Any], synthetic_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """16×2 was the fourth point of the sweep; alone it is the first: the seed set again before each
    point gives the same weights, batches and figures. --json: stdout is sweep.json's object."""
    code = main(["sweep", "--data-dir", str(synthetic_data_dir), "--out", str(tmp_path), "--units", "16",
                 "--layers", "2", "--epochs", str(EPOCHS), "--batch-size", "16", "--no-forest",
                 "--verbose", "0", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    document = json.loads(out)
    assert document == json.loads((tmp_path / "sweep.json").read_text(encoding="utf-8"))
    assert "16×2" in err  # the table went to stderr
    (alone,) = document["points"]
    before = next(p for p in swept["points"] if p["label"] == "16×2")
    for key in ("test_accuracy", "holdout_accuracy", "test_loss", "parameters", "inference"):
        assert alone[key] == before[key], key
    assert document["answers"][2]["answer"].startswith("Not measured: the sweep ran with --no-forest")


def test_ctrl_c_keeps_the_finished_points(synthetic_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Points of a few seconds each: the signal lands in the second.
    command = [sys.executable, "-m", "digitserve.trainer", "sweep", "--data-dir", str(synthetic_data_dir),
               "--out", str(out), "--units", "8,16,32", "--layers", "1", "--epochs", "3",
               "--batch-size", "8", "--verbose", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")} | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "sweep.html").exists():  # written last, after the first point
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    document = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    finished = document["finished"]
    assert 1 <= finished < 4 and len(document["points"]) == finished and not document["complete"]
    with (out / "sweep.csv").open(encoding="utf-8", newline="") as stream:
        assert len(list(csv.DictReader(stream))) == finished
    assert f"{finished} of 4 points finished" in (out / "sweep.html").read_text(encoding="utf-8")
    last = stderr.splitlines()[-2:]
    assert last[0] == (f"mnist-train: sweep interrupted after {finished} of 4 points; {out / 'sweep.csv'}, "
                       f"{out / 'sweep.json'} and {out / 'sweep.html'} hold them"), stderr
    assert re.fullmatch(r"mnist-train: interrupted \(\d+\.\d s after the signal\)", last[1]), stderr
    assert len(stdout.splitlines()) == 1 + finished  # the header and a row per finished point


@pytest.mark.parametrize(("args", "env", "line"), [pytest.param(*case, id=str(n)) for n, case in enumerate([
    (["--units", "0"], {}, "mnist-train sweep: error: argument --units: must be at least 1: 0 in '0'"),
    (["--units", "16,abc"], {}, "mnist-train sweep: error: argument --units: not a comma-separated list of "
     "integers: '16,abc' (e.g. 16,128,512)"),
    (["--layers", "2,-1"], {},
     "mnist-train sweep: error: argument --layers: must be at least 1: -1 in '2,-1'"),
    ([], {"MNIST_UNITS": "x"}, "mnist-train sweep: error: argument --units: not a comma-separated list of "
     "integers: 'x' (e.g. 16,128,512) (from MNIST_UNITS)"),
    (["--publish-best"], {}, "mnist-train: error: --publish-best needs --model-repo (or MNIST_MODEL_REPO)"),
    (["--publish-best", "--model-repo", "REPO"], {},
     "mnist-train: error: --publish-best needs --model-name (or MNIST_MODEL_NAME)"),
    (["--publish-best", "--model-repo", "REPO", "--model-name", "my model"], {},
     "mnist-train: error: model name 'my model' is not a model directory's name (letters, digits, '.', '_', "
     "'-', starting with a letter or digit); the server would never serve it: choose another --model-name"),
    (["--out", "FILE"], {}, "mnist-train: error: --out FILE: not a directory; give the directory for the "
     "sweep's table and page"),
])])
def test_bad_options_are_one_line_and_exit_2_before_any_data_is_read(
    args: list[str], env: dict[str, str], line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in [n for n in os.environ if n.startswith("MNIST_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "FILE").write_text("")
    monkeypatch.chdir(tmp_path)
    # No data there: a check made after loading it would fail another way (exit 1).
    code = main(["sweep", "--data-dir", str(tmp_path / "no-data"), *args])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines()[-1] == line
    assert out == ""
    assert not (tmp_path / "sweep").exists()


def _parameters(units: int, layers: int) -> int:
    """Weights and biases of 784 → units (× layers) → 10."""
    return 784 * units + units + (layers - 1) * (units * units + units) + 10 * units + 10


def _point(units: int | None, layers: int | None, test: float, seconds: float = 10.0) -> Point:
    """A made-up point of 20 epochs (units and layers None: the forest)."""
    if units is None or layers is None:
        return Point(model="random-forest", hidden_units=None, hidden_layers=None, parameters=123_456,
                     epochs=None, train_seconds=seconds, epoch_seconds=None, holdout_accuracy=test,
                     test_accuracy=test, test_loss=None, inference="scikit-learn")
    return Point(model="network", hidden_units=units, hidden_layers=layers,
                 parameters=_parameters(units, layers), epochs=20, train_seconds=seconds,
                 epoch_seconds=seconds / 20, holdout_accuracy=test, test_accuracy=test, test_loss=0.1,
                 inference="litert")


def test_the_answers_say_what_the_figures_show() -> None:
    """Each question's sentence for figures made up to take each branch."""
    grid = [_point(16, 1, 0.8801, 20.0), _point(128, 1, 0.9260, 30.0), _point(512, 1, 0.9790, 60.0),
            _point(16, 3, 0.87, 21.0), _point(128, 3, 0.93, 42.0), _point(512, 3, 0.975, 120.0)]
    assert answer_units(grid) == ("Yes: with 1 hidden layer, 512 units reached 97.90 % test accuracy against "
                                  "92.60 % for the tutorial's 128 (16 units: 88.01 %).")
    worse = [_point(16, 1, 0.95), _point(128, 1, 0.96), _point(512, 1, 0.94)]
    assert answer_units(worse) == ("No: with 1 hidden layer, the tutorial's 128 units were the most accurate "
                                   "(96.00 % test accuracy; 16 units: 95.00 %; 512 units: 94.00 %).")
    assert answer_units([_point(16, 1, 0.77), _point(128, 1, 0.841)]) == (
        "Not measured above the tutorial's 128, the most units of the sweep: with 1 hidden layer, it reached "
        "84.10 % test accuracy, fewer did worse (16 units: 77.00 %); try larger --units.")
    assert answer_layers(grid) == (
        "Yes: at 128 units, 3 hidden layers took 1.40× the time per epoch of 1 (2.10 s against 1.50 s; "
        "1.05× to 2.00× over the 3 unit counts measured with both), because each added layer is a 128×128 "
        "weight matrix and 128 biases, 33,024 more parameters in all (101,770 → 134,794, 1.32×), "
        "multiplied forward and updated backward for every image of every epoch; the deeper network's "
        "test accuracy: 93.00 % against 92.60 %.")
    assert answer_layers([_point(16, 1, 0.8, 20.0), _point(16, 2, 0.9, 18.0)]) == (
        "Not measurably: at 16 units, 2 hidden layers took 0.90× the time per epoch of 1 (0.90 s against "
        "1.00 s): the added layers bring only 272 parameters to the 12,730 of 1 (+2.1%), too little work "
        "to show in the time; the deeper network's test accuracy: 90.00 % against 80.00 %.")
    assert answer_layers(grid[:3]) == "Not measured: the sweep needs at least two layer counts (--layers)."
    forest = _point(None, None, 0.9695, 35.2)
    assert answer_forest([*grid, forest]) == (
        "Better than the tutorial's network, not than the best: the Random Forest (100 trees) reached "
        "96.95 % test accuracy (fitted in 35.2 s), against 92.60 % for the tutorial's 128 units × 1 layer "
        "but 97.90 % for the best network (512×1, 60.0 s); it beat 4 of the 6 networks.")
    assert answer_forest([*grid, _point(None, None, 0.99, 35.2)]) == (
        "Yes: the Random Forest (100 trees) reached 99.00 % test accuracy (fitted in 35.2 s), above every "
        "network of the sweep (the best, 512×1: 97.90 % in 60.0 s).")
    assert answer_forest([*grid, _point(None, None, 0.90, 35.2)]) == (
        "No: the Random Forest (100 trees) reached 90.00 % test accuracy (fitted in 35.2 s), not above the "
        "best network (512×1: 97.90 % in 60.0 s), nor the tutorial's 128×1 (92.60 %); it beat 2 of the 6 "
        "networks.")
    assert answer_forest(grid) == ("Not measured: the sweep ran with --no-forest, or stopped before the "
                                   "forest.")


@pytest.mark.parametrize("layers", [1, 3])
def test_the_mlp_stacks_hidden_layers_and_keeps_the_first_one_s_name(layers: int) -> None:
    import dataclasses

    preset = dataclasses.replace(get_preset("seed"), hidden_units=32, hidden_layers=layers)
    model = build_model(preset)
    dense = [layer.name for layer in model.layers if type(layer).__name__ == "Dense"]
    assert dense == ["hidden", *(f"hidden{n}" for n in range(2, layers + 1)), "probabilities"]
    assert model.count_params() == _parameters(32, layers)
    assert get_preset("seed").hyperparameters()["hidden_layers"] == 1


def test_the_report_links_a_sweep_page_only_when_asked() -> None:
    common: dict[str, Any] = {"title": "t", "labels": ["0", "1"], "confusion_matrix": [[1, 0], [0, 1]],
                              "figures": {}, "metadata": None}
    assert "sweep.html" not in render_html(**common)
    assert '<a href="sweep.html">the sweep\'s page</a>' in render_html(**common, sweep_link="sweep.html")
