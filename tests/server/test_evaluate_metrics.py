"""Evaluate's figures against scikit-learn on a model that makes mistakes (the noisy model, far
from 100 % on its test set, where a transposed confusion matrix, precision swapped with recall
or a loss of the wrong class shows), field by field, through a real server: over the raw stub,
DigitClient and ``mnist-client evaluate --json``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from digitserve.client.cli import main
from digitserve.client.client import DigitClient, encode_images
from digitserve.idx import write_idx
from digitserve.repository import ModelRepository
from digitserve.trainer.train import CHECK_SET_FILE
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread
from tests.support import assert_metrics_match

LABELS = [str(d) for d in range(10)]
BATCH = 64  # images per Evaluate message and per Predict call alike


def noisy_test_set(noisy_repo: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The noisy model's test set: its check set holds every one of its 200 test images."""
    version_dir = ModelRepository(noisy_repo).version_dir("tiny", 1)
    with np.load(version_dir / CHECK_SET_FILE, allow_pickle=False) as check:
        images, labels = check["images"], check["labels"].astype(np.int64)
    assert images.dtype == np.uint8 and images.shape == (200, 784)
    return images, labels


def served_probabilities(stub: pb_grpc.DigitServiceStub, images: npt.NDArray[np.uint8]
                         ) -> npt.NDArray[np.float64]:
    """The served model's probabilities of ``images`` from Predict (not Evaluate), BATCH at a time."""
    rows = []
    for start in range(0, len(images), BATCH):
        response = stub.Predict(pb.PredictRequest(images=encode_images(images[start:start + BATCH])),
                                timeout=60)
        rows += [list(p.probabilities) for p in response.predictions]
    return np.array(rows, dtype=np.float64)


def as_figures(response: pb.EvaluateResponse) -> dict[str, Any]:
    return {
        "count": response.count, "accuracy": response.accuracy,
        "mean_cross_entropy": response.mean_cross_entropy,
        "confusion_matrix": [list(r.counts) for r in response.confusion_matrix],
        "per_class": [{"label": c.label, "precision": c.precision, "recall": c.recall, "f1": c.f1,
                       "support": c.support} for c in response.per_class],
    }


def assert_figures(figures: dict[str, Any], labels: npt.NDArray[np.int64],
                   probs: npt.NDArray[np.float64]) -> None:
    """Every field against scikit-learn (assert_metrics_match), and the class labels in order."""
    assert_metrics_match(figures, labels, probs)
    assert [c["label"] for c in figures["per_class"]] == LABELS


def test_evaluate_figures_equal_scikit_learn_s_on_a_model_that_makes_mistakes(
    start_server: Callable[..., ServerThread], noisy_repo: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    server = start_server(model_repo=noisy_repo, model_name="tiny")
    images, labels = noisy_test_set(noisy_repo)

    def requests() -> Iterator[pb.EvaluateRequest]:
        for start in range(0, len(images), BATCH):
            yield pb.EvaluateRequest(images=encode_images(images[start:start + BATCH]),
                                     labels=labels[start:start + BATCH].tolist())

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        probs = served_probabilities(stub, images)
        response = stub.Evaluate(requests(), timeout=60)

    # The set is one where every figure can go wrong and show it: the model errs often, its
    # confusion matrix is not symmetric, precision differs from recall, it predicts several classes.
    predicted = probs.argmax(axis=1)
    cm = confusion_matrix(labels, predicted, labels=range(10))
    precision, recall, _, _ = precision_recall_fscore_support(
        labels, predicted, labels=range(10), zero_division=0)
    assert accuracy_score(labels, predicted) < 0.9 and len(set(predicted)) >= 3
    assert (cm != cm.T).any() and not np.allclose(precision, recall)

    assert_figures(as_figures(response), labels, probs)
    assert list(response.labels) == LABELS
    assert (response.model_name, response.model_version) == ("tiny", 1)

    with DigitClient(server.target, timeout=60) as client:
        result = client.evaluate(images, labels, batch_size=BATCH)
    assert_figures(result.to_dict(), labels, probs)

    data = tmp_path / "data"  # the same set as IDX files, for mnist-client evaluate --data-dir
    data.mkdir()
    write_idx(data / "t10k-images-idx3-ubyte.gz", images.reshape(-1, 28, 28))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    capsys.readouterr()
    assert main(["--target", server.target, "evaluate", "--data-dir", str(data),
                 "--batch-size", str(BATCH), "--json"]) == 0
    assert_figures(json.loads(capsys.readouterr().out), labels, probs)
