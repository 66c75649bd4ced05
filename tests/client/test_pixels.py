"""One rule turns arrays into pixels for the library and the CLI (images.pixel_values): the same
array passed to DigitClient.predict and saved as .npy for `mnist-client predict --image` gets the
same answer from a real server; and the library says which answers are low-confidence, as the
CLI warns."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from digitserve.client.cli import main
from digitserve.client.client import DigitClient
from digitserve.client.images import load_image, pixel_values
from digitserve.idx import load_split
from tests.servers import ServerThread


def test_a_mask_is_ink_on_background() -> None:
    x = np.zeros(784, dtype=np.int64)
    x[100:300] = 1
    for mask in (x, x.astype(np.uint8), x.tolist()):
        pixels = pixel_values(mask)
        assert pixels.dtype == np.uint8 and set(pixels.tolist()) == {0, 255}
        np.testing.assert_array_equal(pixels, x * 255)
    assert pixel_values(x * 2).tolist() == (x * 2).tolist()  # 0..2: intensities, as before
    np.testing.assert_array_equal(pixel_values(pixel_values(x)), x * 255)  # applied twice: the same


@pytest.mark.parametrize("kind", ["int mask", "uint8 mask", "floats 0..1", "floats 0..255", "uint8"])
def test_the_library_and_the_cli_read_an_array_alike(
    kind: str, tiny_server: ServerThread, synthetic_data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    x = load_split(synthetic_data_dir, "t10k").images[3]
    array = {"int mask": (x > 127).astype(int), "uint8 mask": (x > 127).astype(np.uint8),
             "floats 0..1": x / 255.0, "floats 0..255": x.astype(np.float64),
             "uint8": x}[kind]
    np.save(tmp_path / "x.npy", array)
    assert main(["--target", tiny_server.target, "predict", "--image", str(tmp_path / "x.npy"),
                 "--json"]) == 0
    by_cli = json.loads(capsys.readouterr().out)
    with DigitClient(tiny_server.target) as client:
        by_library = client.predict(array)
        reference = client.predict(x)  # the image as its bytes
    assert by_cli["probabilities"] == by_library.probabilities[0].tolist()
    assert by_cli["class_index"] == by_library.class_indices[0] == reference.class_indices[0]
    assert by_cli["low_confidence"] is by_library.low_confidence[0]
    assert load_image(tmp_path / "x.npy").tolist() == pixel_values(array.reshape(-1)).tolist()


def test_the_library_flags_low_confidence(
    start_server: Callable[..., ServerThread], synthetic_data_dir: Path,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    split = load_split(synthetic_data_dir, "t10k")
    images = np.concatenate([split.images[:4], np.zeros((1, 28, 28), np.uint8)])
    with DigitClient(start_server(low_confidence=0.999).target) as client:
        result = client.predict(images)
        mine = client.predict(images, low_confidence=0.0)
    top = result.probabilities.max(axis=1)
    assert result.low_confidence_threshold == pytest.approx(0.999)  # the server's --low-confidence
    assert result.low_confidence == [bool(p < 0.999) for p in top]
    assert result.top_probabilities == top.tolist()
    assert mine.low_confidence == [False] * 5 and mine.low_confidence_threshold == 0.0
    assert any(result.low_confidence), top  # the blank image at least is a guess
