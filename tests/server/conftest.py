"""Fixtures shared by the server tests that publish real models into a repository of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitserve.repository import ModelRepository


@pytest.fixture
def digits_dir(tiny_repo: Path) -> Path:
    """The tiny model's version directory: a model that reads digits."""
    return ModelRepository(tiny_repo).version_dir("tiny", 1)


@pytest.fixture
def bars_dir(noisy_repo: Path) -> Path:
    """The noisy-bars model's version directory: a worse model of the same shape."""
    return ModelRepository(noisy_repo).version_dir("tiny", 1)
