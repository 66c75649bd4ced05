"""DigitClient.predict with more images than the server takes per request: split into requests
within the limit GetModelInfo gives (asked once per model), answered in order as one call would,
against real servers holding the tiny trained model; a refusal raised as its code's typed error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from digitserve.client import NotServedError
from digitserve.client.client import DigitClient
from digitserve.idx import load_split
from tests.servers import ServerThread


def _counted(client: DigitClient, method: str) -> list[Any]:
    """Records each request the client sends through ``method`` of its stub."""
    sent: list[Any] = []
    call: Callable[..., Any] = getattr(client.stub, method)

    def counting(request: Any, **kwargs: Any) -> Any:
        sent.append(request)
        return call(request, **kwargs)

    setattr(client.stub, method, counting)
    return sent


def test_a_batch_over_the_limit_is_split_in_order(
    start_server: Callable[..., ServerThread], tiny_server: ServerThread, synthetic_data_dir: Path,
) -> None:
    small = start_server(max_images_per_request=4)
    pixels = load_split(synthetic_data_dir, "t10k").images[:10]
    with DigitClient(tiny_server.target) as client:
        whole = client.predict(pixels)  # one call: 10 images are within its limit of 1024
    with DigitClient(small.target) as client:
        infos, predicts = _counted(client, "GetModelInfo"), _counted(client, "Predict")
        split = client.predict(pixels)
        again = client.predict(pixels.reshape(10, -1).astype(np.float32) / np.float32(255))
        assert client.max_images_per_request() == 4
        with pytest.raises(NotServedError) as missing:  # a refusal: its code's typed error
            client.predict(pixels, model_version=7)
    assert missing.value.details() == ("model 'tiny' version 7 is not served (serving version 1; "
                                       "loaded: 1)")
    predicts.pop()
    assert [len(r.images) for r in predicts] == [4, 4, 2, 4, 4, 2]
    assert len(infos) == 1  # the limit (and the input shape) asked once for the model
    np.testing.assert_array_equal(split.probabilities, whole.probabilities)
    np.testing.assert_array_equal(again.probabilities, whole.probabilities)
    assert split.class_indices == whole.class_indices and split.labels == whole.labels
    assert (split.model_name, split.model_version) == ("tiny", 1)
    # After the first answer the rest are pinned to its version: one version answers them all.
    assert [r.model_version for r in predicts[:3]] == [0, 1, 1]
