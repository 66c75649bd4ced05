"""``mnist-client predict`` on a photo: preprocessed here or by the server (the same pixels), and
confidence where it matters: a warning line below the server's low-confidence threshold (or
``--low-confidence``), exit 3 below ``--fail-below``; exact output."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from digitserve.client.cli import main
from tests.servers import ServerThread
from tests.support import digit_photo


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "two.jpg"
    path.write_bytes(digit_photo("JPEG"))
    return path


def answer(target: str, photo: Path, capsys: pytest.CaptureFixture[str]) -> tuple[float, str]:
    """The top probability and label of the photo, and that predict said nothing on stderr."""
    assert main(["--target", target, "predict", "--image", str(photo), "--json",
                 "--low-confidence", "0"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert err == "" and result["low_confidence"] is False
    top = max(result["probabilities"])
    assert 0 < top < 1 and result["probabilities"][result["class_index"]] == top
    return top, result["label"]


def test_an_answer_below_the_server_s_threshold_gets_a_warning_line(
    start_server: Callable[..., ServerThread], photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(low_confidence=1.0)  # every answer below 1 is low-confidence
    top, label = answer(server.target, photo, capsys)
    assert main(["--target", server.target, "predict", "--image", str(photo)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{photo} → model tiny v1"
    assert out.splitlines()[-1] == f"predicted: {label} (p={top:.4f})"
    assert err == (f"mnist-client: warning: low confidence: top probability {top:.4f} (label "
                   f"{label}) is below 1 (the server's --low-confidence); the answer may be a guess\n")
    assert main(["--target", server.target, "predict", "--image", str(photo), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (result["low_confidence"], result["low_confidence_threshold"]) == (True, 1.0)
    assert err.startswith("mnist-client: warning: low confidence: ")


def test_the_client_s_threshold_replaces_the_server_s(
    start_server: Callable[..., ServerThread], photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(low_confidence=0.0)  # the server counts nothing as low-confidence
    top, label = answer(server.target, photo, capsys)
    assert main(["--target", server.target, "predict", "--image", str(photo)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["--target", server.target, "predict", "--image", str(photo),
                 "--low-confidence", "1"]) == 0
    assert capsys.readouterr().err == (
        f"mnist-client: warning: low confidence: top probability {top:.4f} (label {label}) is "
        "below 1 (--low-confidence); the answer may be a guess\n")


def test_fail_below_exits_3_with_one_line(
    tiny_server: ServerThread, photo: Path, synthetic_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    top, label = answer(tiny_server.target, photo, capsys)
    for preprocess in ("client", "server"):
        assert main(["--target", tiny_server.target, "predict", "--image", str(photo),
                     "--preprocess", preprocess, "--fail-below", "1"]) == 3
        out, err = capsys.readouterr()
        assert out.splitlines()[-1] == f"predicted: {label} (p={top:.4f})"  # the answer is shown
        assert err == (f"mnist-client: error: top probability {top:.4f} (label {label}) is below "
                       "--fail-below 1\n")
    assert main(["--target", tiny_server.target, "predict", "--image", str(photo),
                 "--fail-below", f"{top / 2}", "--low-confidence", "0"]) == 0
    assert capsys.readouterr().err == ""
    # --data-dir images too.
    assert main(["--target", tiny_server.target, "predict", "--data-dir", str(synthetic_data_dir),
                 "--index", "3", "--json", "--fail-below", "1"]) == 3
    out, err = capsys.readouterr()
    result = json.loads(out)
    top = max(result["probabilities"])
    assert err == (f"mnist-client: error: top probability {top:.4f} (label {result['label']}) is "
                   "below --fail-below 1\n")


@pytest.mark.parametrize(("flag", "value"), [("--fail-below", "1.5"), ("--low-confidence", "-0.1")])
def test_a_threshold_that_is_not_a_probability_is_one_line(
    tiny_server: ServerThread, photo: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    assert main(["--target", tiny_server.target, "predict", "--image", str(photo), flag, value]) == 1
    assert capsys.readouterr().err == (f"mnist-client: error: {flag} {float(value)} is not a "
                                       "probability; expected a value in [0, 1]\n")


def test_a_picture_the_server_cannot_use_is_one_line_either_way(
    tiny_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.new("L", (64, 48), 210).save(blank)
    reason = "the picture is blank (no ink stands out of the background); expected a digit"
    assert main(["--target", tiny_server.target, "predict", "--image", str(blank)]) == 1
    assert capsys.readouterr().err == f"mnist-client: error: {blank}: {reason}\n"
    assert main(["--target", tiny_server.target, "predict", "--image", str(blank),
                 "--preprocess", "server"]) == 1
    assert capsys.readouterr().err == (f"mnist-client: error: {tiny_server.target}: "
                                       f"INVALID_ARGUMENT: images[0].encoded: {reason}\n")
    assert main(["--target", tiny_server.target, "predict", "--image", str(tmp_path / "no.png"),
                 "--preprocess", "server"]) == 1
    assert capsys.readouterr().err == f"mnist-client: error: {tmp_path / 'no.png'}: no such file\n"
