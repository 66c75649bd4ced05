"""The quality gate's gaps (issue 12): a version without a check set, metadata that was edited
after publishing (its checksum file, its labels bound to the check set's), clear refusals for
versions whose files do not belong together, and refusals that never import TensorFlow. Every
file the gate reads checked against its SHA-256 (issue 21, item 4): one byte flipped in each
file of a version, a check set rewritten under a running server, a file swapped right after its
check, and a check set the metadata records no digest for."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
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
        model = source(tmp_path, allow_missing_check_set=True).load(1).model
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
        f"{directory}/metadata.json: sha256 is {actual}, metadata.json.sha256 says {published}; "
        "the file changed after publishing: republish the version"
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
        model = source(tmp_path).load(1).model
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


# --- every file the gate reads is checked against its SHA-256 (issue 21, item 4) -----------------

CHANGED = "the file changed after publishing: republish the version"

VERSION_FILES = ("metadata.json", "metadata.json.sha256", "model.keras", "model.tflite",
                 "check_set.npz")
"""Every file of a version the trainer publishes (tiny_repo's has no report: the server never
reads report/, which the gate does not check)."""


def test_the_cases_cover_every_file_of_a_published_version(tiny_repo: Path) -> None:
    version_dir = ModelRepository(tiny_repo).version_dir("tiny", 1)
    assert sorted(p.name for p in version_dir.iterdir()) == sorted(VERSION_FILES)


def flip_one_byte(path: Path) -> bytes:
    """Flips one bit of one byte of the file (in the middle; in metadata.json.sha256, the first
    hex digit of the digest that stays a hex digit, so the line still parses); its new bytes."""
    data = bytearray(path.read_bytes())
    if path.name == "metadata.json.sha256":
        offset = next(i for i, c in enumerate(data) if chr(c ^ 1) in "0123456789abcdef")
    else:
        offset = len(data) // 2
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


def expected_refusal(directory: Path, name: str, flipped: bytes) -> str:
    """The one line refusing a version whose file ``name`` now holds ``flipped``."""
    if name.startswith("metadata.json"):  # metadata.json checked against metadata.json.sha256
        recorded = (directory / "metadata.json.sha256").read_text().split()[0]
        actual = sha256((directory / "metadata.json").read_bytes())
        return (f"{directory}/metadata.json: sha256 is {actual}, metadata.json.sha256 says "
                f"{recorded}; {CHANGED}")
    recorded = json.loads((directory / "metadata.json").read_text())["files"][name]["sha256"]
    return f"{directory}/{name}: sha256 is {sha256(flipped)}, metadata.json says {recorded}; {CHANGED}"


@pytest.mark.parametrize(("name", "inference", "served_by"), [
    *((name, "auto", "LiteRTModel") for name in VERSION_FILES),
    ("model.keras", "tensorflow", "KerasModel"),  # the Keras path reads it to load it
])
def test_one_byte_flipped_in_any_file_refuses_the_version(
    tiny_repo: Path, tmp_path: Path, name: str, inference: str, served_by: str
) -> None:
    directory = publish_copy(tiny_repo, tmp_path, 1)
    assert type(source(tmp_path, inference=inference).load(1).model).__name__ == served_by  # untouched
    flipped = flip_one_byte(directory / name)
    with pytest.raises(CorruptVersionError) as info:
        source(tmp_path, inference=inference).load(1)
    assert str(info.value) == expected_refusal(directory, name, flipped)


def relabel_one_image(arrays: dict[str, np.ndarray]) -> None:
    """One check-set label changed and an array added: the check-set accuracy moves by one image,
    which the reproduction check allows."""
    arrays["labels"] = arrays["labels"].copy()
    arrays["labels"][0] = (arrays["labels"][0] + 1) % 10
    arrays["extra"] = np.arange(3)


def test_a_rewritten_check_set_is_refused_by_a_serving_server(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess]
) -> None:
    # The attack of issue 21: version 2's check set rewritten after publishing (its metadata and
    # metadata.json.sha256 as published), one label changed and an array added. Main served it.
    publish_copy(tiny_repo, tmp_path, 1)
    server = spawn("--model-repo", str(tmp_path), "--model-name", "tiny", "--metrics-port", "-1",
                   "--log-format", "text", "--reload-interval", "0.2")
    with DigitClient(server.target(), timeout=30) as client:
        assert client.wait_until_serving(60) == "SERVING"
        staged = publish_copy(tiny_repo, tmp_path / "staging", 2)
        path = staged / "check_set.npz"
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        relabel_one_image(arrays)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        path.write_bytes(buffer.getvalue())
        published = tmp_path / "tiny" / "2"
        staged.rename(published)
        expected = expected_refusal(published, "check_set.npz", buffer.getvalue())
        deadline = time.monotonic() + 60  # generous: the server looks every 0.2 s
        while "2" not in (info := client.model_info())["refused_versions"] \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert info["refused_versions"] == {"2": expected}
        assert info["version"] == 1
        assert client.predict(np.zeros((1, 28, 28), np.uint8)).model_version == 1
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert f"refused model tiny version 2: {expected}" in server.log


def test_a_check_set_the_metadata_records_no_checksum_for_loads_with_one_warning(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A check set put into a version after publishing (the operator's, for a version published
    # without one) or by a publisher that recorded no checksum for it: not refused, said once.
    def unlisted(meta: dict[str, Any]) -> None:
        del meta["files"]["check_set.npz"]

    directory = publish_copy(tiny_repo, tmp_path, 1, metadata=unlisted)
    with caplog.at_level(logging.WARNING):
        model = source(tmp_path).load(1).model
    assert model.spec.version == 1 and type(model).__name__ == "LiteRTModel"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"{directory}/check_set.npz: metadata.json records no sha256 for it "
                        "(added after publishing, or published without one): the check set is "
                        "used unverified"]


def test_a_model_file_the_metadata_records_no_checksum_for_is_refused(
    tiny_repo: Path, tmp_path: Path
) -> None:
    # Model files have always been checked: one without a recorded checksum stays refused.
    def unlisted(meta: dict[str, Any]) -> None:
        del meta["files"]["model.keras"]

    directory = publish_copy(tiny_repo, tmp_path, 1, metadata=unlisted)
    with pytest.raises(CorruptVersionError) as info:
        source(tmp_path).load(1)
    assert str(info.value) == f"{directory}/metadata.json: no checksum for model.keras"


def swap_after_check(monkeypatch: pytest.MonkeyPatch, path: Path,
                     swap: Callable[[], None]) -> list[str]:
    """Calls ``swap`` (which rewrites ``path`` and perhaps more) right after the gate hashed the
    bytes ``path`` holds now: a writer racing the gate between its check and its use. Returns
    the list the swap's name is appended to when it ran."""
    import digitserve.metadata

    original, hashed = path.read_bytes(), digitserve.metadata.sha256_bytes
    ran: list[str] = []

    def racing(data: bytes) -> str:
        digest = hashed(data)
        if data == original and not ran:
            swap()
            ran.append(path.name)
        return digest

    monkeypatch.setattr(digitserve.metadata, "sha256_bytes", racing)
    return ran


@pytest.mark.parametrize(("name", "inference", "served_by"), [
    ("metadata.json", "auto", "LiteRTModel"),
    ("check_set.npz", "auto", "LiteRTModel"),
    ("model.tflite", "auto", "LiteRTModel"),
    ("model.keras", "tensorflow", "KerasModel"),
])
def test_a_file_swapped_after_its_check_is_not_what_the_gate_uses(
    tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    name: str, inference: str, served_by: str
) -> None:
    # Read once, hashed and used from the same bytes: a swap after the check changes nothing.
    directory = publish_copy(tiny_repo, tmp_path, 1)
    path = directory / name

    def swap() -> None:
        if name == "metadata.json":  # a consistent pair, labels reversed: it would serve wrongly
            meta = json.loads(path.read_text())
            reverse_labels(meta)
            data = json.dumps(meta).encode()
            path.write_bytes(data)
            (directory / "metadata.json.sha256").write_text(f"{sha256(data)}  metadata.json\n")
        else:
            path.write_bytes(b"PK\x03\x04 swapped after the check")

    ran = swap_after_check(monkeypatch, path, swap)
    model = source(tmp_path, inference=inference).load(1).model
    assert ran == [name]
    assert type(model).__name__ == served_by
    assert model.spec.labels == tuple(str(d) for d in range(10))
