"""Every preset trains with a hold-out split that the metadata records, and its report draws the
validation curves beside the training ones (issue 25 item 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from digitserve.repository import REPORT_DIR, ModelRepository
from tests.support import require_module

require_module("matplotlib", "the trainer extra: pip install -e '.[trainer]'", allow_module_level=True)

from digitserve.trainer.presets import PRESETS  # noqa: E402
from digitserve.trainer.report import TRAINING_CURVES_FILE  # noqa: E402

TRAINING_IMAGES = 600  # the synthetic_data_dir fixture's
VALIDATION_COLOUR = (1.0, 0x7F / 255, 0x0E / 255)  # matplotlib's second colour (C1): the validation lines
TRAINING_COLOUR = (0x1F / 255, 0x77 / 255, 0xB4 / 255)  # its first (C0): the training lines


def _pixels_of(png: Path, colour: tuple[float, float, float]) -> int:
    from matplotlib.image import imread

    rgb = imread(png)[..., :3]
    return int(np.all(np.abs(rgb - np.array(colour)) < 0.02, axis=-1).sum())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_holds_out_part_of_the_training_images_and_reports_validation_curves(
        preset: str, synthetic_data_dir: Path, tmp_path: Path) -> None:
    from digitserve.trainer.train import TrainConfig, run

    assert PRESETS[preset].holdout_fraction > 0
    summary = run(TrainConfig(data_dir=synthetic_data_dir, model_repo=tmp_path, name="m", preset=preset,
                              epochs=2, batch_size=32, seed=5, verbose=0))
    meta = ModelRepository(tmp_path).read_metadata("m", summary["version"])
    fraction = meta["hyperparameters"]["holdout_fraction"]
    assert fraction == PRESETS[preset].holdout_fraction
    _, held = train_test_split(np.arange(TRAINING_IMAGES), test_size=fraction, random_state=5)
    assert meta["data"]["holdout_size"] == len(held) == TRAINING_IMAGES - meta["data"]["train_size"]
    assert meta["metrics"]["holdout_accuracy"] == summary["holdout_accuracy"]
    assert len(meta["history"]["val_accuracy"]) == len(meta["history"]["val_loss"]) == 2
    curves = Path(summary["path"]) / REPORT_DIR / TRAINING_CURVES_FILE
    assert _pixels_of(curves, TRAINING_COLOUR) > 200
    assert _pixels_of(curves, VALIDATION_COLOUR) > 200
