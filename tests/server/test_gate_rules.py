"""The gate fits the data (issue 15, item 4): a version serves when its check-set accuracy
reproduces the figure its trainer recorded, whatever that figure is; the operator's rules on top
(--min-check-accuracy, --max-regression) are off by default, and a refusal names its flag."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.metadata import Metadata
from digitserve.repository import ModelRepository
from digitserve.server.versions import GateRules, QualityGateError, RepositorySource
from tests.server.test_gate import publish_copy
from tests.servers import ServerThread
from tests.support import publish_copy as publish_files
from tests.support import wait_for


def recorded_accuracy(repo: Path, version: int = 1) -> float:
    check_set = Metadata.read(ModelRepository(repo).version_dir("tiny", version)).check_set
    assert check_set is not None and check_set.accuracy is not None
    return check_set.accuracy


def test_a_seed_model_of_non_mnist_data_serves_with_the_default_gate(
    noisy_repo: Path, start_server: Callable[..., ServerThread], capsys: pytest.CaptureFixture[str]
) -> None:
    accuracy = recorded_accuracy(noisy_repo)
    with capsys.disabled():
        print(f"\nseed preset on noisy bars: check-set accuracy {accuracy:.4f} (recorded)")
    assert 0.15 < accuracy < 0.9
    server = start_server(model_repo=noisy_repo, model_name="tiny")
    with DigitClient(server.target, timeout=30) as client:
        assert client.model_info()["version"] == 1
        images = np.zeros((2, 784), dtype=np.uint8)
        assert client.predict(images).model_version == 1


def test_the_floor_is_an_operator_rule_and_its_refusal_names_the_flag(noisy_repo: Path) -> None:
    accuracy = recorded_accuracy(noisy_repo)
    with pytest.raises(QualityGateError) as info:
        RepositorySource(noisy_repo, "tiny").load(1, GateRules(min_accuracy=0.9))
    correct = round(accuracy * 200)
    assert str(info.value) == (f"check-set accuracy {accuracy:.4f} ({correct} of 200 images) is "
                               "below the floor 0.9000 set by --min-check-accuracy")


def test_a_regression_beyond_max_regression_is_refused_and_names_the_flag(
    tiny_repo: Path, noisy_repo: Path, start_server: Callable[..., ServerThread]
) -> None:
    # Serving tiny (1.0 on its check set); the noisy model, published as version 2, reproduces
    # its own figure but is far worse: refused with --max-regression 0.05, served without it.
    noisy = ModelRepository(noisy_repo).version_dir("tiny", 1)
    accuracy = recorded_accuracy(noisy_repo)
    for rule, served in ((0.05, 1), (1.0, 2)):
        server = start_server(reload_interval=0.2, max_regression=rule)
        repo = ModelRepository(server.app.settings.model_repo)
        assert publish_files(repo, noisy) == 2
        with DigitClient(server.target, timeout=30) as client:
            if served == 1:
                wait_for(lambda: "2" in client.model_info()["refused_versions"], what="the refusal")
                info = client.model_info()
                assert info["version"] == 1
                correct = round(accuracy * 200)
                assert info["refused_versions"]["2"] == (
                    f"check-set accuracy {accuracy:.4f} ({correct} of 200 images) is "
                    f"{1 - accuracy:.4f} below the 1.0000 of version 1, now serving: more than the "
                    "0.0500 allowed by --max-regression")
            else:
                wait_for(lambda: client.model_info()["version"] == 2, what="version 2 served")
        server.stop()
        shutil.rmtree(repo.root)  # the next server starts from a fresh copy of tiny


def set_recorded(value: float) -> Callable[[dict[str, Any]], None]:
    def edit(meta: dict[str, Any]) -> None:
        meta["check_set"]["accuracy"] = value
    return edit


def wrong_labels(arrays: dict[str, np.ndarray]) -> None:
    arrays["labels"][:20] = (arrays["labels"][:20] + 1) % 10  # 20 images now answered wrong


def test_a_figure_that_does_not_reproduce_is_refused(tiny_repo: Path, tmp_path: Path) -> None:
    # Re-published with valid checksums: only the gate's own check can tell.
    figure = publish_copy(tiny_repo, tmp_path, 1, metadata=set_recorded(0.9))
    labels = publish_copy(tiny_repo, tmp_path, 2, check_set=wrong_labels)
    within = publish_copy(tiny_repo, tmp_path, 3, metadata=set_recorded(0.995))  # one image
    source = RepositorySource(tmp_path, "tiny")
    with pytest.raises(QualityGateError) as info:
        source.load(1)
    assert str(info.value) == (
        "check-set accuracy 1.0000 (200 of 200 images) does not reproduce the 0.9000 (180 of 200) "
        "the trainer recorded in metadata.json (the gate allows 1 image of difference): the "
        "model, its check set or the figure is not what was trained; publish the version again")
    with pytest.raises(QualityGateError) as info:
        source.load(2)
    assert str(info.value).startswith(
        "check-set accuracy 0.9000 (180 of 200 images) does not reproduce the 1.0000 (200 of 200)")
    assert source.load(3).model.spec.version == 3
    assert figure.exists() and labels.exists() and within.exists()


def test_a_version_without_a_recorded_figure_gets_the_other_checks(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def drop(meta: dict[str, Any]) -> None:
        del meta["check_set"]["accuracy"]

    directory = publish_copy(tiny_repo, tmp_path, 1, metadata=drop)
    with caplog.at_level(logging.WARNING, logger="digitserve.server.versions"):
        assert RepositorySource(tmp_path, "tiny").load(1).model.spec.version == 1
    assert (f"{directory} records no check-set accuracy (published before the trainer recorded "
            "it): the gate cannot check that it reproduces") in caplog.text
    with pytest.raises(QualityGateError, match="set by --min-check-accuracy"):
        publish_copy(tiny_repo, tmp_path, 2, metadata=drop, check_set=wrong_labels)
        RepositorySource(tmp_path, "tiny").load(2, GateRules(min_accuracy=0.95))


def test_the_rules_are_settings_off_by_default() -> None:
    from digitserve.server.settings import load_settings

    defaults = load_settings(["--model-repo", "r"], env={})
    assert (defaults.min_check_accuracy, defaults.max_regression) == (0.0, 1.0)
    assert load_settings(["--model-repo", "r", "--max-regression", "0.02"], env={}).max_regression == 0.02
    assert load_settings(["--model-repo", "r"], env={"MNIST_MAX_REGRESSION": "0.1"}).max_regression == 0.1
    with pytest.raises(ValueError, match=r"^max regression 1.5 is not in \[0, 1\]$"):
        load_settings(["--model-repo", "r", "--max-regression", "1.5"], env={})
