"""digitserve.inference: the inference path is LiteRT only when it agrees with model.predict; a
version's published flatbuffer serves without TensorFlow while it agrees with the trainer's
reference."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.inference import (
    AGREEMENT_FLOOR,
    InferencePathError,
    KerasModel,
    LiteRTModel,
    LiteRTRunner,
    load_version,
    read_check_set,
)
from digitserve.repository import LITERT_FILE, CorruptVersionError, ModelRepository
from digitserve.v1 import digit_service_pb2 as pb
from tests.servers import ServerProcess


def version_dir(tiny_repo: Path) -> Path:
    return ModelRepository(tiny_repo).version_dir("tiny", 1)


def test_auto_serves_litert_within_the_tolerance_and_the_trainer_recorded_it(tiny_repo: Path) -> None:
    model = KerasModel.load(version_dir(tiny_repo))
    agreement = model.agreement
    metadata = json.loads((version_dir(tiny_repo) / "metadata.json").read_text())
    assert model.inference_path == "litert" and model.inline
    assert agreement.images == metadata["check_set"]["count"] and agreement.litert_diff is not None
    assert agreement.litert_diff <= agreement.tolerance == max(AGREEMENT_FLOOR, agreement.tensorflow_spread)
    x = np.random.default_rng(3).random((40, 784), dtype=np.float32)
    reference = model._keras_model.predict(x, verbose=0)
    assert np.abs(model.predict(x) - reference).max() <= agreement.tolerance
    # The trainer chose on the same images, hence the same path, and wrote it down.
    recorded = metadata["inference"]
    assert recorded["path"] == "litert" and recorded["probe_images"] == agreement.images


def test_tensorflow_on_request(tiny_repo: Path) -> None:
    model = KerasModel.load(version_dir(tiny_repo), inference="tensorflow")
    assert model.inference_path == "tensorflow" and not model.inline
    x = np.zeros((3, 784), np.float32)
    np.testing.assert_array_equal(model.predict(x), model.tensorflow_predict(x))


@pytest.mark.parametrize("error", [1e-3, float("nan")])
def test_a_litert_path_that_disagrees_is_not_served(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, error: float
) -> None:
    exact = LiteRTRunner.__call__

    def off(self: LiteRTRunner, images: np.ndarray) -> np.ndarray:
        return exact(self, images) + np.float32(error)

    monkeypatch.setattr(LiteRTRunner, "__call__", off)
    model = KerasModel.load(version_dir(tiny_repo))
    assert model.inference_path == "tensorflow" and not model.inline
    assert "differs by more than the tolerance" in model.agreement.describe()
    with pytest.raises(InferencePathError, match="differs by more than the tolerance"):
        KerasModel.load(version_dir(tiny_repo), inference="litert")


def test_a_litert_path_within_float32_rounding_of_model_predict_is_served(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3e-6: the order two float32 kernels of one network differ by (a one-epoch default model
    # trained in the train image: LiteRT 1.46e-6 against TensorFlow's batch-1 spread 1.04e-6),
    # above this model's spread, which a floor of 1e-6 refused (a serve image then serves nothing)
    exact = LiteRTRunner.__call__

    def rounded(self: LiteRTRunner, images: np.ndarray) -> np.ndarray:
        return exact(self, images) + np.float32(3e-6)

    monkeypatch.setattr(LiteRTRunner, "__call__", rounded)
    model = KerasModel.load(version_dir(tiny_repo))
    assert model.agreement.tensorflow_spread < 2.5e-6
    assert model.agreement.litert_diff is not None and 2.5e-6 < model.agreement.litert_diff < 3.5e-6
    assert model.inference_path == "litert" and model.inline, model.agreement.describe()


def test_bad_choice_is_refused(tiny_repo: Path) -> None:
    with pytest.raises(ValueError, match="not one of auto, litert, tensorflow"):
        KerasModel.load(version_dir(tiny_repo), inference="onnx")


def copy_version(tiny_repo: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "tiny" / "1"
    shutil.copytree(version_dir(tiny_repo), target)
    return target


def rewrite_listed(directory: Path, name: str, data: bytes) -> None:
    """Replaces a file of a version and its checksum in the metadata, and the metadata's own
    checksum (a consistent version)."""
    from digitserve.metadata import sha256_file, write_metadata_checksum

    (directory / name).write_bytes(data)
    metadata = json.loads((directory / "metadata.json").read_text())
    metadata["files"][name]["sha256"] = sha256_file(directory / name)
    (directory / "metadata.json").write_text(json.dumps(metadata))
    write_metadata_checksum(directory)


def test_the_trainer_publishes_the_flatbuffer_it_measured_and_its_reference(tiny_repo: Path) -> None:
    directory = version_dir(tiny_repo)
    metadata = json.loads((directory / "metadata.json").read_text())
    recorded = metadata["inference"]
    assert recorded["litert_file"] == LITERT_FILE and LITERT_FILE in metadata["files"]
    assert recorded["tolerance"] == max(AGREEMENT_FLOOR, recorded["tensorflow_batch1_max_diff"])
    check_set = read_check_set(directory)
    assert check_set is not None and check_set.reference is not None
    keras_model = KerasModel.load(directory)._keras_model
    np.testing.assert_array_equal(check_set.reference,
                                  keras_model.predict(check_set.images, verbose=0))


def test_a_version_with_a_flatbuffer_serves_without_tensorflow(tiny_repo: Path) -> None:
    # A fresh interpreter: this test process has TensorFlow loaded by other tests.
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from digitserve.inference import load_version, read_check_set\n"
        f"d = Path({str(version_dir(tiny_repo))!r})\n"
        "m = load_version(d, check_set=read_check_set(d))\n"
        "print(type(m).__name__, m.inference_path, m.inline, 'tensorflow' in sys.modules, "
        "'keras' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["LiteRTModel", "litert", "True", "False", "False"]


def test_the_server_process_maps_no_tensorflow(tiny_repo: Path, spawn: type[ServerProcess]) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--metrics-port", "-1")
    with DigitClient(server.target(), timeout=30) as client:
        assert client.wait_until_serving(60) == "SERVING"
        info = client.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.inference_path == "litert"
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "tensorflow" not in maps and "litert" in maps


def test_the_flatbuffer_answers_as_the_trainers_measurements(tiny_repo: Path) -> None:
    directory = version_dir(tiny_repo)
    served = load_version(directory, check_set=read_check_set(directory))
    assert isinstance(served, LiteRTModel)
    assert served.agreement.litert_diff is not None
    assert served.agreement.litert_diff <= json.loads(
        (directory / "metadata.json").read_text())["inference"]["tolerance"]
    converted = KerasModel.load(directory)  # converts the Keras model again, as before
    x = np.random.default_rng(5).random((64, 784), dtype=np.float32)
    np.testing.assert_array_equal(served.predict(x), converted.predict(x))


def test_tensorflow_or_an_old_version_load_the_keras_model(tiny_repo: Path, tmp_path: Path) -> None:
    directory = version_dir(tiny_repo)
    check_set = read_check_set(directory)
    assert isinstance(load_version(directory, inference="tensorflow", check_set=check_set), KerasModel)
    old = copy_version(tiny_repo, tmp_path)
    (old / LITERT_FILE).unlink()  # as versions published before the flatbuffer
    model = load_version(old, check_set=read_check_set(old))
    assert isinstance(model, KerasModel) and model.inference_path == "litert"


def test_a_tampered_flatbuffer_is_a_corrupt_version(tiny_repo: Path, tmp_path: Path) -> None:
    directory = copy_version(tiny_repo, tmp_path)
    data = bytearray((directory / LITERT_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / LITERT_FILE).write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match=r"model\.tflite: sha256"):
        load_version(directory, check_set=read_check_set(directory))


def test_a_flatbuffer_off_the_reference_falls_back_to_the_keras_model(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = copy_version(tiny_repo, tmp_path)
    with np.load(directory / "check_set.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["reference"] = arrays["reference"] + np.float32(1e-3)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    rewrite_listed(directory, "check_set.npz", buffer.getvalue())
    with caplog.at_level("INFO", logger="digitserve.inference.loading"):
        model = load_version(directory, check_set=read_check_set(directory))
    assert isinstance(model, KerasModel)  # which compares with model.predict itself
    assert "model.tflite differs from the trainer's reference by 1.00e-03" in caplog.text


def test_a_reference_of_the_wrong_shape_is_not_compared(tiny_repo: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    directory = copy_version(tiny_repo, tmp_path)
    with np.load(directory / "check_set.npz") as data:
        arrays = {key: data[key] for key in data.files}
    arrays["reference"] = arrays["reference"][:, :1]  # would broadcast against (500, 10)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    rewrite_listed(directory, "check_set.npz", buffer.getvalue())
    with caplog.at_level("INFO", logger="digitserve.inference.loading"):
        model = load_version(directory, check_set=read_check_set(directory))
    n = arrays["labels"].shape[0]
    assert isinstance(model, KerasModel)
    assert f"reference probabilities of shape ({n}, 1), expected ({n}, 10)" in caplog.text


def test_read_only_pixels_answer_as_writable_ones_whatever_the_batch_sizes(tiny_repo: Path) -> None:
    # LiteRTRunner copies a read-only array (pixels straight from a request's bytes) into the input
    # tensor's view instead of set_tensor: the same answers, across resizes in either order.
    runner = LiteRTRunner((version_dir(tiny_repo) / LITERT_FILE).read_bytes())
    x = np.random.default_rng(9).random((64, 784), dtype=np.float32)
    for rows in (1, 64, 3, 64, 1):
        writable = x[:rows].copy()
        read_only = np.frombuffer(writable.tobytes(), dtype=np.float32).reshape(rows, 784)
        assert not read_only.flags.writeable
        expected = runner(writable)
        np.testing.assert_array_equal(runner(read_only), expected)
        np.testing.assert_array_equal(runner(writable), expected)
        # each image's answer does not depend on its batch (so a stale input would show)
        np.testing.assert_allclose(expected, runner(x)[:rows], rtol=0, atol=1e-6)
