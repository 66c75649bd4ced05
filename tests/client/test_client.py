"""The client library and the mnist-client CLI against a real server holding the tiny trained model,
served from its repository as mnist-serve serves it (tiny_server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitserve.client.cli import main
from digitserve.client.client import DigitClient
from digitserve.client.images import ImageError, load_image
from digitserve.idx import load_split
from digitserve.inference import KerasModel
from digitserve.repository import ModelRepository
from tests.servers import ServerThread
from tests.support import assert_metrics_match


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_repo: Path) -> Path:
    return ModelRepository(tiny_repo).version_dir("tiny", 1)


def test_predict_matches_the_saved_model(tiny_server: ServerThread, tiny_model_dir: Path,
                                         synthetic_data_dir: Path) -> None:
    split = load_split(synthetic_data_dir, "t10k")
    pixels = split.images[:5].reshape(5, -1)
    local = KerasModel.load(tiny_model_dir).predict(pixels.astype(np.float32) / np.float32(255))
    with DigitClient(tiny_server.target) as client:
        by_bytes = client.predict(pixels)
        by_floats = client.predict(pixels.astype(np.float32) / np.float32(255))
    np.testing.assert_allclose(by_bytes.probabilities, local, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(by_bytes.probabilities, by_floats.probabilities)
    assert by_bytes.class_indices == list(np.argmax(local, axis=1))
    assert (by_bytes.model_name, by_bytes.model_version) == ("tiny", 1)


def test_evaluate_cli_reproduces_the_trainer_metrics(
    tiny_server: ServerThread, tiny_model_dir: Path, synthetic_data_dir: Path,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    plot = tmp_path / "cm.png"
    code = main(["--target", tiny_server.target, "evaluate", "--data-dir", str(synthetic_data_dir),
                 "--json", "--plot", str(plot)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((tiny_model_dir / "metadata.json").read_text())["metrics"]
    assert result["count"] == 200
    assert result["accuracy"] == metrics["test_accuracy"]
    assert result["confusion_matrix"] == metrics["confusion_matrix"]
    assert result["mean_cross_entropy"] == pytest.approx(metrics["test_loss"], abs=1e-9)
    # And the figures themselves, against scikit-learn on the saved model's own probabilities.
    split = load_split(synthetic_data_dir, "t10k")
    pixels = split.images.reshape(len(split.labels), -1).astype(np.float32) / np.float32(255)
    assert_metrics_match(result, split.labels, KerasModel.load(tiny_model_dir).predict(pixels))
    assert result["model_version"] == 1
    with Image.open(plot) as picture:
        assert picture.size[0] > 100


def test_evaluate_cli_table_and_min_accuracy(
    tiny_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", tiny_server.target, "evaluate", "--data-dir",
                 str(synthetic_data_dir), "--limit", "50", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "50 images, accuracy" in out and "true\\pred" in out
    assert main(["--target", tiny_server.target, "evaluate", "--data-dir",
                 str(synthetic_data_dir), "--min-accuracy", "1.01"]) == 1
    assert "is below --min-accuracy 1.01" in capsys.readouterr().err


def test_predict_cli_from_idx_png_and_npy(
    tiny_server: ServerThread, synthetic_data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    split = load_split(synthetic_data_dir, "t10k")
    assert main(["--target", tiny_server.target, "predict", "--data-dir", str(synthetic_data_dir),
                 "--index", "3", "--json"]) == 0
    from_idx = json.loads(capsys.readouterr().out)
    assert from_idx["true_label"] == int(split.labels[3])
    assert sum(from_idx["probabilities"]) == pytest.approx(1, abs=1e-5)

    np.save(tmp_path / "x.npy", split.images[3])
    assert main(["--target", tiny_server.target, "predict", "--image", str(tmp_path / "x.npy"),
                 "--json"]) == 0
    from_npy = json.loads(capsys.readouterr().out)
    assert from_npy["probabilities"] == from_idx["probabilities"]

    Image.fromarray(255 - split.images[3]).resize((112, 112)).save(tmp_path / "x.png")
    assert main(["--target", tiny_server.target, "predict", "--image",
                 str(tmp_path / "x.png")]) == 0
    assert "predicted:" in capsys.readouterr().out


def test_predict_cli_errors_are_one_line(
    tiny_server: ServerThread, synthetic_data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--target", tiny_server.target, "predict", "--data-dir",
                 str(synthetic_data_dir), "--index", "200"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--index 200 is out of range" in err and "holds 200" in err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["--target", tiny_server.target, "predict", "--image",
                 str(tmp_path / "bad.png")]) == 1
    assert capsys.readouterr().err.endswith("bad.png: not a PNG, JPEG or WebP image (it starts with "
                                            "b'not a pn')\n")
    assert main(["--target", tiny_server.target, "predict", "--image", str(tmp_path / "no.npy")]) == 1
    assert "no.npy: no such file" in capsys.readouterr().err
    assert main(["--target", tiny_server.target, "predict", "--data-dir", str(tmp_path)]) == 1
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().err


def test_info_and_health_cli(tiny_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", tiny_server.target, "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # GetModelInfo's response, metadata parsed
    assert info["model_name"] == "tiny" and info["model_version"] == 1 and info["preset"] == "seed"
    assert info["input_shape"] == [28, 28] and len(info["labels"]) == 10
    assert info["metadata"]["name"] == "tiny" and info["metadata"]["input"]["shape"] == [28, 28]
    assert main(["--target", tiny_server.target, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_unreachable_server_is_one_line_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "127.0.0.1:1", "--timeout", "0.5", "health"]) == 1
    err = capsys.readouterr().err
    assert err == ("mnist-client: error: cannot connect to 127.0.0.1:1: connection refused "
                   "(is mnist-serve running?)\n")


def test_load_image_normalises_pictures(tmp_path: Path) -> None:
    canvas = np.full((200, 150), 250, dtype=np.uint8)  # dark ink on white paper, off-centre
    canvas[40:160, 20:40] = 10
    Image.fromarray(canvas).convert("RGB").save(tmp_path / "one.jpg")
    pixels = load_image(tmp_path / "one.jpg").reshape(28, 28)
    assert pixels.dtype == np.uint8 and pixels.max() >= 240
    assert pixels[0].max() == 0 and pixels[:, 0].max() == 0  # inverted: black background
    rows, _ = np.nonzero(pixels > 128)
    assert rows.max() - rows.min() + 1 <= 20  # fitted in the 20×20 box
    assert abs(np.average(np.arange(28), weights=pixels.sum(axis=1)) - 14) < 1.5  # centred
    np.save(tmp_path / "f.npy", np.full((28, 28), 0.5))
    assert load_image(tmp_path / "f.npy").max() == 0.5  # floats in [0, 1] kept, as predict keeps them
    np.save(tmp_path / "wrong.npy", np.zeros(10))
    with pytest.raises(ImageError, match=r"holds 10 values of shape \(10,\); expected 784"):
        load_image(tmp_path / "wrong.npy")
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(ImageError, match="blank"):
        load_image(tmp_path / "blank.png")
