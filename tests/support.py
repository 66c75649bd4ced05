"""Helpers the tests share (fixtures stay in conftest.py): publishing a copy of a version, reading
a server's metrics endpoint."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from digitserve.repository import METADATA_FILE, ModelRepository

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def publish_copy(repo: ModelRepository, source_dir: Path, name: str = "tiny") -> int:
    """Publishes every file of ``source_dir`` (model.tflite included, so it loads without
    TensorFlow) as the next version of ``name``; the repository writes the metadata with its
    checksums. Returns the version."""

    def build(staging: Path, version: int) -> dict[str, Any]:
        for path in source_dir.iterdir():
            if path.is_file() and not path.name.startswith(METADATA_FILE):
                shutil.copy(path, staging / path.name)
        metadata: dict[str, Any] = json.loads((source_dir / METADATA_FILE).read_text())
        metadata.pop("files", None)
        return metadata

    version, _ = repo.publish(name, build)
    return version


def scrape(port: int) -> Samples:
    """Every sample of the metrics endpoint on 127.0.0.1:``port``, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples
