"""Tests of the trainer on tiny synthetic IDX data: training, publishing, metadata, report, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from digitserve.idx import md5_uncompressed, write_idx
from digitserve.metadata import sha256_file, verify_files
from digitserve.metrics import MetricsAccumulator
from digitserve.repository import (
    LITERT_FILE,
    MODEL_FILE,
    ModelRepository,
)
from digitserve.trainer.cli import main
from digitserve.trainer.errors import TrainerError
from digitserve.trainer.presets import PRESETS, build_model, get_preset
from digitserve.trainer.train import CHECK_SET_FILE, EVALUATE_BATCH, LABELS, TrainConfig, run, scale_images
from tests.support import assert_metrics_match, oracle_metrics

TRAIN_SIZE = 300
TEST_SIZE = 600  # more than the 500 images of the check set
REPORT_PNGS = ["report/confusion_matrix.png", "report/training_curves.png", "report/samples.png"]
REPORT_FILES = [*REPORT_PNGS, "report/index.html"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _digits(
    rng: np.random.Generator, n: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Noisy images where class k is a bright bar at row 2 + 2k: learnable, not trivial."""
    labels = np.tile(np.arange(10, dtype=np.uint8), n // 10 + 1)[:n]
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row = 2 + 2 * int(label)
        images[i, row : row + 2, 4:24] = rng.integers(180, 256, size=(2, 20), dtype=np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_SIZE), ("t10k", TEST_SIZE)):
        images, labels = _digits(rng, n)
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def _config(data_dir: Path, repo: Path, preset: str, **kwargs: Any) -> TrainConfig:
    settings: dict[str, Any] = {"name": "digits", "epochs": 1, "verbose": 0, **kwargs}
    return TrainConfig(data_dir=data_dir, model_repo=repo, preset=preset, **settings)


@pytest.fixture(scope="module")
def published(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """One repository with version 1 (seed preset) and version 2 (default preset)."""
    repo = tmp_path_factory.mktemp("repo")
    seed = run(_config(data_dir, repo, "seed"))
    default = run(_config(data_dir, repo, "default", batch_size=64))
    return repo, seed, default


def _test_split(data_dir: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    from digitserve.idx import load_split

    split = load_split(data_dir, "t10k")
    return scale_images(split.images), split.labels


def test_versions_published_one_after_the_other(
    published: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    repo, seed, default = published
    assert ModelRepository(repo).versions("digits") == [1, 2]
    assert (seed["version"], seed["preset"]) == (1, "seed")
    assert (default["version"], default["preset"]) == (2, "default")
    for summary in (seed, default):
        version_dir = ModelRepository(repo).version_dir("digits", summary["version"])
        assert Path(summary["path"]) == version_dir
        assert 0.0 <= summary["test_accuracy"] <= 1.0
        assert summary["test_loss"] > 0
        assert summary["train_seconds"] > 0
        assert summary["test_size"] == TEST_SIZE
        assert summary["report"] == str(Path(summary["path"]) / "report")
    assert seed["train_size"] == TRAIN_SIZE * 3 // 4
    assert 0.0 <= seed["holdout_accuracy"] <= 1.0
    assert default["train_size"] == TRAIN_SIZE * 9 // 10  # every preset holds part out (issue 25)
    assert 0.0 <= default["holdout_accuracy"] <= 1.0
    assert "baseline_accuracy" not in default


@pytest.mark.parametrize("version", [1, 2])
def test_metadata_records_everything(
    published: tuple[Path, dict[str, Any], dict[str, Any]], data_dir: Path, version: int
) -> None:
    repo, *_ = published
    repository = ModelRepository(repo)
    meta = repository.read_metadata("digits", version)
    version_dir = repository.version_dir("digits", version)
    preset = "seed" if version == 1 else "default"

    assert meta["format"] == 1
    assert (meta["name"], meta["version"], meta["preset"], meta["seed"]) == (
        "digits", version, preset, 42
    )
    expected_hp = get_preset(preset).with_overrides(
        epochs=1, batch_size=None if version == 1 else 64
    ).hyperparameters()
    assert meta["hyperparameters"] == expected_hp
    assert meta["input"] == {"shape": [28, 28], "size": 784, "scale": 1 / 255, "dtype": "float32"}
    assert meta["labels"] == [str(d) for d in range(10)]

    files = meta["data"]["files"]
    assert sorted(files) == sorted(
        f"{split}-{kind}-ubyte.gz"
        for split in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    )
    for name, sums in files.items():
        assert sums == {
            "md5_uncompressed": md5_uncompressed(data_dir / name),
            "sha256": sha256_file(data_dir / name),
        }
    assert meta["data"]["dir"] == str(data_dir.resolve())
    assert meta["data"]["test_size"] == TEST_SIZE
    # the seed preset holds out 25 % of the training images, the default one 10 %
    held = 75 if preset == "seed" else 30
    assert (meta["data"]["train_size"], meta["data"]["holdout_size"]) == (TRAIN_SIZE - held, held)
    assert 0.0 <= meta["metrics"]["holdout_accuracy"] <= 1.0
    assert set(meta["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(values) == 1 for values in meta["history"].values())

    metrics = meta["metrics"]
    assert np.asarray(metrics["confusion_matrix"]).shape == (10, 10)
    assert np.asarray(metrics["confusion_matrix"]).sum() == TEST_SIZE
    assert [c["label"] for c in metrics["per_class"]] == LABELS
    assert set(meta["versions"]) >= {"python", "tensorflow", "keras", "numpy", "scikit-learn"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["created_at"])
    assert meta["train_seconds"] > 0

    # Every file is checksummed, the report included, and the checksums hold.
    assert meta["report"] == REPORT_FILES
    # The LiteRT flatbuffer is published when it is the path the metrics were computed with.
    litert = {LITERT_FILE} if meta["inference"]["path"] == "litert" else set()
    assert set(meta["files"]) == {MODEL_FILE, CHECK_SET_FILE, *REPORT_FILES, *litert}
    assert meta["inference"].get("litert_file") == (LITERT_FILE if litert else None)
    verify_files(version_dir, meta)
    for rel in REPORT_PNGS:
        assert (version_dir / rel).read_bytes()[:8] == PNG_MAGIC
    page = (version_dir / "report/index.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == len(REPORT_PNGS)  # one self-contained file
    assert f"{100 * metrics['test_accuracy']:.2f} %" in page


@pytest.mark.parametrize("version", [1, 2])
def test_saved_model_round_trip(
    published: tuple[Path, dict[str, Any], dict[str, Any]], data_dir: Path, version: int
) -> None:
    import keras

    from digitserve.inference import KerasModel

    repo, *_ = published
    version_dir = ModelRepository(repo).version_dir("digits", version)
    x, _ = _test_split(data_dir)
    reloaded = keras.saving.load_model(version_dir / MODEL_FILE, compile=False, safe_mode=True)
    served = KerasModel.load(version_dir)
    expected = np.asarray(reloaded.predict(x[:64], verbose=0))
    np.testing.assert_allclose(served.predict(x[:64]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_metadata_metrics_equal_the_servers_figures(
    published: tuple[Path, dict[str, Any], dict[str, Any]], data_dir: Path, version: int
) -> None:
    from digitserve.inference import KerasModel

    repo, *_ = published
    version_dir = ModelRepository(repo).version_dir("digits", version)
    meta = ModelRepository(repo).read_metadata("digits", version)
    served = KerasModel.load(version_dir)
    x, y = _test_split(data_dir)

    accumulator = MetricsAccumulator(LABELS)
    chunks = []
    for start in range(0, len(y), EVALUATE_BATCH):
        chunk = slice(start, start + EVALUATE_BATCH)
        chunks.append(served.predict(x[chunk]))
        accumulator.update(y[chunk], chunks[-1])
    recomputed = accumulator.result()
    # The figures themselves, against scikit-learn (not the accumulator both sides share).
    metrics = meta["metrics"]
    assert_metrics_match({"count": len(y), "accuracy": metrics["test_accuracy"],
                          "mean_cross_entropy": metrics["test_loss"],
                          "confusion_matrix": metrics["confusion_matrix"],
                          "per_class": metrics["per_class"]}, y, np.concatenate(chunks))
    assert meta["metrics"]["test_accuracy"] == recomputed.accuracy
    assert meta["metrics"]["test_loss"] == recomputed.mean_cross_entropy
    assert meta["metrics"]["confusion_matrix"] == recomputed.confusion_matrix
    assert meta["metrics"]["per_class"] == recomputed.to_dict()["per_class"]

    # The check set: the first 500 test images, raw, and the figures the server gate will find.
    with np.load(version_dir / CHECK_SET_FILE, allow_pickle=False) as check:
        images, labels = check["images"], check["labels"]
    assert images.dtype == np.uint8 and images.shape == (500, 784)
    np.testing.assert_array_equal(scale_images(images), x[:500])
    np.testing.assert_array_equal(labels, y[:500])
    gate = MetricsAccumulator(LABELS)
    gate_probs = served.predict(scale_images(images))
    gate.update(labels, gate_probs)
    oracle = oracle_metrics(labels, gate_probs)
    assert gate.result().accuracy == pytest.approx(oracle["accuracy"], rel=1e-12)
    assert gate.result().mean_cross_entropy == pytest.approx(oracle["mean_cross_entropy"], rel=1e-9)
    assert meta["check_set"] == {
        "file": CHECK_SET_FILE,
        "count": 500,
        "accuracy": gate.result().accuracy,
        "mean_cross_entropy": gate.result().mean_cross_entropy,
    }


@pytest.mark.parametrize("version", [1, 2])
def test_the_check_set_names_the_labels_and_the_metadata_is_checksummed(
    published: tuple[Path, dict[str, Any], dict[str, Any]], version: int
) -> None:
    import hashlib

    repo, *_ = published
    version_dir = ModelRepository(repo).version_dir("digits", version)
    with np.load(version_dir / CHECK_SET_FILE, allow_pickle=False) as check:
        assert check["label_names"].tolist() == LABELS
    digest = hashlib.sha256((version_dir / "metadata.json").read_bytes()).hexdigest()
    assert (version_dir / "metadata.json.sha256").read_text() == f"{digest}  metadata.json\n"


def test_the_loser_of_a_publish_race_reports_the_version_it_was_published_as(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from digitserve.trainer import report as trainer_report

    written = trainer_report.write_report
    titles: list[str] = []

    def report_then_lose_the_race(report_dir: Path, **kwargs: Any) -> list[Path]:
        titles.append(kwargs["title"])
        if len(titles) == 1:  # another trainer publishes version 1 while this one writes
            ModelRepository(tmp_path).publish("digits", lambda staging, v: {"name": "digits"})
        return written(report_dir, **kwargs)

    monkeypatch.setattr(trainer_report, "write_report", report_then_lose_the_race)
    summary = run(_config(data_dir, tmp_path, "seed"))
    assert summary["version"] == 2
    assert titles == ["digits v1 (seed)", "digits v2 (seed)"]
    version_dir = Path(summary["path"])
    page = (version_dir / "report" / "index.html").read_text()
    assert "<title>digits v2 (seed): training report</title>" in page and "digits v1" not in page
    meta = ModelRepository(tmp_path).read_metadata("digits", 2)
    assert meta["version"] == 2
    verify_files(version_dir, meta)  # the report's checksums are those of the rewritten files


def test_same_seed_same_metrics(
    published: tuple[Path, dict[str, Any], dict[str, Any]],
    data_dir: Path,
    tmp_path: Path,
) -> None:
    _, seed, _ = published
    again = run(_config(data_dir, tmp_path / "again", "seed", report=False))
    other = run(_config(data_dir, tmp_path / "other", "seed", report=False, seed=7))
    assert again["version"] == 1
    assert again["test_accuracy"] == seed["test_accuracy"]
    assert again["test_loss"] == seed["test_loss"]
    assert again["holdout_accuracy"] == seed["holdout_accuracy"]
    assert other["test_loss"] != seed["test_loss"]
    assert not (Path(again["path"]) / "report").exists()
    assert again["report"] is None


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_takes_flat_pixels_and_ends_in_softmax(preset: str, tmp_path: Path) -> None:
    import keras

    model = build_model(preset)
    assert tuple(model.input_shape) == (None, 784)
    assert tuple(model.output_shape) == (None, 10)
    x = np.random.default_rng(1).random((4, 784), dtype=np.float32)
    probs = np.asarray(model(x, training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", compile=False, safe_mode=True)
    # Augmentation layers (cnn) are inactive at inference, so predictions are reproducible.
    np.testing.assert_allclose(np.asarray(reloaded(x, training=False)), probs, rtol=1e-5, atol=1e-6)


def test_cnn_preset_trains_and_publishes(data_dir: Path, tmp_path: Path) -> None:
    # The augmentation and batch-normalisation layers train under op determinism, save and load.
    summary = run(_config(data_dir, tmp_path, "cnn", report=False))
    meta = ModelRepository(tmp_path).read_metadata("digits", 1)
    assert meta["hyperparameters"]["augment_rotation"] > 0
    assert meta["metrics"]["test_accuracy"] == summary["test_accuracy"]
    litert = {LITERT_FILE} if meta["inference"]["path"] == "litert" else set()
    assert set(meta["files"]) == {MODEL_FILE, CHECK_SET_FILE, *litert}


def test_bad_configuration_is_a_trainer_error(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="unknown preset"):
        run(TrainConfig(data_dir=data_dir, model_repo=tmp_path, name="m", preset="huge"))
    with pytest.raises(TrainerError, match="epochs must be at least 1"):
        run(_config(data_dir, tmp_path, "seed", epochs=0))
    with pytest.raises(TrainerError, match="unknown baseline"):
        run(_config(data_dir, tmp_path, "seed", baseline="svm"))
    assert not (tmp_path / "m").exists()


def test_cli_missing_data_dir_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "train", "--data-dir", str(tmp_path / "absent"), "--model-repo", str(tmp_path / "repo"),
        "--name", "digits", "--preset", "seed", "--epochs", "1",
    ])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("mnist-train: error: ")
    assert "absent" in lines[-1]
    assert "Traceback" not in err
    assert ModelRepository(tmp_path / "repo").versions("digits") == []


def test_cli_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "seed"]) == 2
    assert "required" in capsys.readouterr().err


def test_cli_json_prints_one_object_with_the_baseline(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "train", "--data-dir", str(data_dir), "--model-repo", str(tmp_path), "--name", "cli",
        "--preset", "seed", "--epochs", "1", "--batch-size", "32", "--baseline", "random-forest",
        "--no-report", "--json",
    ])
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out)  # Keras' summary and progress went to stderr
    assert "Layer (type)" in err and "val_accuracy" in err
    assert (summary["name"], summary["version"], summary["preset"]) == ("cli", 1, "seed")
    assert summary["path"] == str(tmp_path / "cli" / "1")
    assert summary["batch_size"] == 32
    assert 0.0 <= summary["baseline_accuracy"] <= 1.0
    meta = ModelRepository(tmp_path).read_metadata("cli", 1)
    assert meta["metrics"]["test_accuracy"] == summary["test_accuracy"]
    assert meta["metrics"]["baseline"]["accuracy"] == summary["baseline_accuracy"]
    assert meta["metrics"]["baseline"]["name"] == "random-forest"
    assert meta["report"] == []


def test_the_recorded_test_and_hold_out_figures_equal_scikit_learn_s_on_a_model_that_makes_mistakes(
    noisy_repo: Path, tmp_path: Path,
) -> None:
    """The noisy model (the seed preset, whose 75/25 split of the training images sets a hold-out
    aside, trained on noisy_bars): far from 100 %, so a figure computed on the wrong images, or
    the wrong way, shows. The hold-out is drawn again here as the preset documents it
    (scikit-learn's train_test_split, random_state = the recorded seed) from the very training
    images (their recorded checksum), and read by the published model as a server loads it."""
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split

    from digitserve.inference import load_version, read_check_set
    from tests.support import noisy_bars

    repository = ModelRepository(noisy_repo)
    version_dir = repository.version_dir("tiny", 1)
    meta = repository.read_metadata("tiny", 1)
    images, labels = noisy_bars(600, 11)  # the noisy_repo fixture's training images
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    assert md5_uncompressed(tmp_path / "train-images-idx3-ubyte.gz") == \
        meta["data"]["files"]["train-images-idx3-ubyte.gz"]["md5_uncompressed"]
    fraction = meta["hyperparameters"]["holdout_fraction"]
    assert fraction == 0.25
    _, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=meta["seed"])
    assert len(held) == meta["data"]["holdout_size"] == 150
    model = load_version(version_dir, check_set=read_check_set(version_dir))
    assert model.inference_path == meta["inference"]["path"]
    probs = model.predict(scale_images(images[held]))
    oracle = oracle_metrics(labels[held], probs)
    metrics = meta["metrics"]
    assert metrics["holdout_accuracy"] == pytest.approx(
        accuracy_score(labels[held], probs.argmax(axis=1)), rel=1e-12)
    assert metrics["holdout_accuracy"] < 0.9  # the model makes mistakes on it
    assert metrics["holdout_loss"] == pytest.approx(oracle["mean_cross_entropy"], rel=1e-6)

    # The test-set figures too: its 200 images are all in the check set.
    with np.load(version_dir / CHECK_SET_FILE, allow_pickle=False) as check:
        test_images, test_labels = check["images"], check["labels"]
    assert len(test_labels) == meta["data"]["test_size"] == 200
    test_probs = model.predict(scale_images(test_images))
    assert_metrics_match({"count": len(test_labels), "accuracy": metrics["test_accuracy"],
                          "mean_cross_entropy": metrics["test_loss"],
                          "confusion_matrix": metrics["confusion_matrix"],
                          "per_class": metrics["per_class"]}, test_labels, test_probs)
    assert metrics["test_accuracy"] < 0.9
