"""The quality gate's gaps (issue 12): a version without a check set, metadata that was edited
after publishing (its checksum file, its labels bound to the check set's), clear refusals for
versions whose files do not belong together, and refusals that never import TensorFlow."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.repository import CorruptVersionError, ModelRepository
from digitserve.server.versions import QualityGateError, RepositorySource
from tests.servers import ServerProcess
from tests.support import REPO_ROOT

ROOT = REPO_ROOT


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish_copy(
    tiny_repo: Path, root: Path, version: int, *,
    metadata: Callable[[dict[str, Any]], None] | None = None,
    check_set: Callable[[dict[str, np.ndarray]], None] | None = None,
    check_set_bytes: bytes | None = None,
    remove: tuple[str, ...] = (),
    metadata_checksum: str = "rewrite",
) -> Path:
    """Copies tiny's version 1 into ``root/tiny/VERSION`` as a publisher would have written it
    with the changes given (files listed with their checksums, ``metadata.json.sha256`` rewritten
    when the source has one), or, with ``metadata_checksum="stale"``, with the metadata edited
    after publishing (its checksum file left as published), or ``"absent"`` (main's format)."""
    source = ModelRepository(tiny_repo).version_dir("tiny", 1)
    target = root / "tiny" / str(version)
    shutil.copytree(source, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta["version"] = version
    if check_set is not None:
        with np.load(target / "check_set.npz", allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        check_set(arrays)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        check_set_bytes = buffer.getvalue()
    if check_set_bytes is not None:
        (target / "check_set.npz").write_bytes(check_set_bytes)
        meta["files"]["check_set.npz"]["sha256"] = sha256(check_set_bytes)
    for name in remove:
        (target / name).unlink()
        meta["files"].pop(name, None)
    checksum = target / "metadata.json.sha256"
    published = json.dumps(meta, indent=2).encode()
    if metadata is not None:
        metadata(meta)
    data = json.dumps(meta, indent=2).encode()
    (target / "metadata.json").write_bytes(data)
    if metadata_checksum == "absent":
        checksum.unlink(missing_ok=True)
    else:
        # "stale": the checksum the publisher wrote before the metadata was edited
        digest = sha256(data if metadata_checksum == "rewrite" else published)
        checksum.write_text(f"{digest}  metadata.json\n")
    return target


def source(root: Path, **kwargs: Any) -> RepositorySource:
    return RepositorySource(root, "tiny", **kwargs)


def reverse_labels(meta: dict[str, Any]) -> None:
    meta["labels"] = meta["labels"][::-1]


def test_a_version_without_a_check_set_is_refused_unless_the_operator_allows_it(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = publish_copy(tiny_repo, tmp_path, 1, remove=("check_set.npz",))
    with pytest.raises(QualityGateError) as info:
        source(tmp_path).load(1)
    assert str(info.value) == (
        f"{directory}/check_set.npz is missing, so the gate cannot check the version's answers: "
        "publish the version with its check set, or start the server with --allow-missing-check-set to "
        "serve it unchecked"
    )
    with caplog.at_level(logging.WARNING, logger="digitserve.server.versions"):
        model = source(tmp_path, allow_missing_check_set=True).load(1)
    assert model.spec.version == 1
    assert f"{directory} has no check_set.npz: serving it unchecked (--allow-missing-check-set)" \
        in caplog.text


def test_the_override_is_a_setting_off_by_default() -> None:
    from digitserve.server.settings import load_settings

    assert not load_settings(["--model-repo", "r"], env={}).allow_missing_check_set
    assert load_settings(["--model-repo", "r", "--allow-missing-check-set"], env={}) \
        .allow_missing_check_set
    assert load_settings(["--model-repo", "r"], env={"MNIST_ALLOW_MISSING_CHECK_SET": "true"}) \
        .allow_missing_check_set
    with pytest.raises(SystemExit) as info:
        load_settings(["--model-repo", "r"], env={"MNIST_ALLOW_MISSING_CHECK_SET": "maybe"})
    assert info.value.code == 2


def test_a_server_refuses_to_start_on_a_version_without_a_check_set(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess]
) -> None:
    directory = publish_copy(tiny_repo, tmp_path, 1, remove=("check_set.npz",))
    server = spawn("--model-repo", str(tmp_path), "--model-name", "tiny", "--log-format", "text",
                   "--exit-if-no-model")
    assert server.wait(60) == 1
    assert (f"cannot load model tiny: no servable version of model 'tiny' (version 1: "
            f"{directory}/check_set.npz is missing") in server.log


def test_metadata_edited_after_publishing_is_refused(tiny_repo: Path, tmp_path: Path) -> None:
    # The labels reversed by hand: an image of a 7 would come back class 7, label "2".
    directory = publish_copy(tiny_repo, tmp_path, 1, metadata=reverse_labels,
                             metadata_checksum="stale")
    published = (directory / "metadata.json.sha256").read_text().split()[0]
    actual = sha256((directory / "metadata.json").read_bytes())
    with pytest.raises(CorruptVersionError) as info:
        source(tmp_path).load(1)
    assert str(info.value) == (
        f"{directory}/metadata.json: sha256 {actual} differs from {published} recorded in "
        "metadata.json.sha256 (the metadata was changed after publishing)"
    )


def test_labels_that_differ_from_the_check_sets_are_refused(tiny_repo: Path, tmp_path: Path) -> None:
    # Even with a matching checksum file (a publisher that wrote the wrong labels).
    directory = publish_copy(tiny_repo, tmp_path, 1, metadata=reverse_labels)
    with pytest.raises(CorruptVersionError) as info:
        source(tmp_path).load(1)
    digits = [str(d) for d in range(10)]
    assert str(info.value) == (
        f"{directory}/check_set.npz: metadata.json labels {digits[::-1]} differ from the label "
        f"names the check set was published with {digits}"
    )


def test_a_malformed_checksum_file_is_refused(tiny_repo: Path, tmp_path: Path) -> None:
    directory = publish_copy(tiny_repo, tmp_path, 1)
    (directory / "metadata.json.sha256").write_text("not a checksum\n")
    with pytest.raises(CorruptVersionError) as info:
        source(tmp_path).load(1)
    assert str(info.value) == (
        f"{directory}/metadata.json.sha256: expected one line '<sha256 hex>  metadata.json', "
        "found 'not a checksum\\n'"
    )


def test_a_version_without_a_metadata_checksum_loads_with_a_warning(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Versions published before the checksum file (main's format 1) still load.
    directory = publish_copy(tiny_repo, tmp_path, 1, metadata_checksum="absent")
    with caplog.at_level(logging.WARNING, logger="digitserve.server.versions"):
        model = source(tmp_path).load(1)
    assert model.spec.version == 1 and type(model).__name__ == "LiteRTModel"
    assert (f"{directory} has no metadata.json.sha256 (published before metadata was "
            "checksummed): its metadata is served unverified") in caplog.text


# --- refusals without TensorFlow, in a fresh process --------------------------------------------

def three_labels(meta: dict[str, Any]) -> None:
    meta["labels"] = ["0", "1", "2"]


def input_20x20(meta: dict[str, Any]) -> None:
    meta["input"]["shape"], meta["input"]["size"] = [20, 20], 400


def check_set_20x20(arrays: dict[str, np.ndarray]) -> None:
    arrays["images"] = arrays["images"].reshape(-1, 28, 28)[:, :20, :20].copy()


DAMAGE: dict[str, tuple[dict[str, Any], str]] = {
    "3 labels in metadata": (
        {"metadata": three_labels},
        "check_set.npz: check-set labels range over 0..9 but metadata.json declares 3 labels",
    ),
    "check set without labels": (
        {"check_set": lambda arrays: arrays.pop("labels")},
        "check_set.npz: unreadable check set ('labels is not a file in the archive')",
    ),
    "check set not a zip archive": (
        {"check_set_bytes": b"PK\x03\x04 not a zip archive"},
        "check_set.npz: unreadable check set (File is not a zip file)",
    ),
    "metadata input 20x20": (
        {"metadata": input_20x20},
        "check_set.npz: the check set's images have 784 values but metadata.json declares"
        " input shape [20, 20] (400 values): the version's files do not belong together",
    ),
    "check set and metadata 20x20": (
        {"metadata": input_20x20, "check_set": check_set_20x20},
        "model.tflite: the model takes inputs of shape [784] (784 values) but metadata.json "
        "declares input shape [20, 20] (400 values)",
    ),
}

PROBE = """
import json, resource, sys, time
from pathlib import Path
started = time.perf_counter()
from digitserve.server.versions import RepositorySource
try:
    RepositorySource(Path(sys.argv[1]), "tiny").load(int(sys.argv[2]))
    outcome = "served"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
seconds = time.perf_counter() - started
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:"))
print(json.dumps({"outcome": outcome, "tensorflow": "tensorflow" in sys.modules,
                  "rss_mb": rss / 1024, "seconds": seconds}))
"""


def probe(root: Path, version: int) -> dict[str, Any]:
    """Loads a version in a fresh interpreter (this one has TensorFlow from other tests)."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(root), str(version)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_refusals_never_import_tensorflow(tiny_repo: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    publish_copy(tiny_repo, tmp_path, 1)
    baseline = probe(tmp_path, 1)
    assert baseline["outcome"] == "served" and not baseline["tensorflow"]
    lines = [f"served (LiteRT): RSS {baseline['rss_mb']:.0f} MB, {baseline['seconds']:.2f} s"]
    failures = []
    for version, (name, (damage, reason)) in enumerate(DAMAGE.items(), start=2):
        directory = publish_copy(tiny_repo, tmp_path, version, **damage)
        result = probe(tmp_path, version)
        lines.append(f"refused ({name}): RSS {result['rss_mb']:.0f} MB, {result['seconds']:.2f} s, "
                     f"tensorflow imported: {result['tensorflow']}")
        if not result["outcome"].startswith(f"CorruptVersionError: {directory}/{reason}"):
            failures.append((name, result["outcome"]))
        if result["tensorflow"] or result["rss_mb"] > baseline["rss_mb"] + 50:
            failures.append((name, result))
    with capsys.disabled():
        print("\nfresh process, one version loaded by RepositorySource:\n  " + "\n  ".join(lines))
    assert not failures, failures


def test_a_server_refusing_a_newer_version_maps_no_tensorflow(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    publish_copy(tiny_repo, tmp_path, 1)
    publish_copy(tiny_repo, tmp_path, 2, metadata=three_labels)
    server = spawn("--model-repo", str(tmp_path), "--model-name", "tiny", "--metrics-port", "-1",
                   "--log-format", "text")
    with DigitClient(server.target(), timeout=30) as client:
        assert client.wait_until_serving(60) == "SERVING"
        info = client.model_info()
    assert info["version"] == 1
    assert "check-set labels range over 0..9 but metadata.json declares 3 labels" \
        in info["refused_versions"]["2"]
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    with capsys.disabled():
        print(f"\nserver serving version 1 after refusing version 2 (3 labels): RSS {rss / 1024:.0f} MB")
    assert "tensorflow" not in maps
