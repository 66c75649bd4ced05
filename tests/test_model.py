"""server/model.py: the inference path is LiteRT only when it agrees with model.predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from digitserve.repository import ModelRepository
from server.model import AGREEMENT_FLOOR, InferencePathError, KerasModel, LiteRTRunner


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


def test_bad_choice_is_refused(tiny_repo: Path) -> None:
    with pytest.raises(ValueError, match="not one of auto, litert, tensorflow"):
        KerasModel.load(version_dir(tiny_repo), inference="onnx")
