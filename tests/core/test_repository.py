"""digitserve.repository: canonical version names, staging left by killed publishers, the loser
of a publish race, and the metadata's own checksum."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from digitserve.metadata import read_metadata, verify_files
from digitserve.repository import ModelRepository
from tests.support import REPO_ROOT


def build_file(content: str) -> Any:
    def build(staging: Path, version: int) -> dict[str, Any]:
        (staging / "model.bin").write_text(content)
        return {"name": "m", "built_as": version}

    return build


def test_only_canonical_integers_are_versions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model_dir = tmp_path / "m"
    for name in ("1", "002", "²", "0", "-3", "+4", " 5", "6 ", "٧", "README", ".staging-x"):
        (model_dir / name).mkdir(parents=True)
    (model_dir / "8").write_text("a file, not a version")
    repo = ModelRepository(tmp_path)
    with caplog.at_level(logging.WARNING, logger="digitserve.repository"):
        assert repo.versions("m") == [1]
        assert repo.versions("m") == [1]  # warned once per entry, not at every look
    warned = [r.getMessage() for r in caplog.records]
    assert sorted(warned) == sorted(
        f"ignoring {model_dir / name}: not a version directory (versions are directories named "
        "1, 2, 3, ... without leading zeros)"
        for name in ("002", "²", "0", "-3", "+4", " 5", "6 ", "٧", "README", "8")
    )
    # "002" does not block a real 2.
    version, path = repo.publish("m", build_file("two"))
    assert (version, path) == (2, model_dir / "2") and repo.versions("m") == [1, 2]
    assert (model_dir / "002").is_dir()


def age(path: Path, seconds: float) -> None:
    """Sets the modification times of ``path`` and everything under it to ``seconds`` ago."""
    past = time.time() - seconds
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.utime(os.path.join(root, name), (past, past))
    os.utime(path, (past, past))


HELD_PUBLISH = """
import sys, time
from pathlib import Path
from digitserve.repository import ModelRepository

def build(staging, version):
    (staging / "model.bin").write_text("slow")
    print(staging, flush=True)
    sys.stdin.readline()  # until the test lets it finish
    return {"name": "m"}

print(ModelRepository(sys.argv[1]).publish("m", build)[0], flush=True)
"""


def test_the_next_publish_removes_staging_left_by_killed_publishers_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tmp_path / "m"
    # A live publisher (another process) whose staging directory has not changed for two hours.
    live = subprocess.Popen([sys.executable, "-c", HELD_PUBLISH, str(tmp_path)], cwd=REPO_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdin is not None
        held = Path(live.stdout.readline().strip())
        age(held, 2 * 3600)
        stale = model_dir / ".staging-killed"
        (stale / "report").mkdir(parents=True)
        (stale / "model.bin").write_text("half written")
        age(stale, 2 * 3600)
        recent = model_dir / ".staging-recent"  # killed a minute ago, or a publisher taking no lock
        recent.mkdir()
        (recent / "model.bin").write_text("x")
        age(recent, 60)
        with caplog.at_level(logging.WARNING, logger="digitserve.repository"):
            version, _ = ModelRepository(tmp_path).publish("m", build_file("mine"))
        assert version == 1
        assert not stale.exists() and recent.is_dir() and held.is_dir()
        assert re.search(rf"removed {re.escape(str(stale))}, a staging directory last written "
                         r"72\d\ds ago \(a publisher was killed\)", caplog.text), caplog.text
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "2" and live.wait(30) == 0
    finally:
        live.kill()
        live.communicate()  # closes the pipes
    assert (model_dir / "2" / "model.bin").read_text() == "slow"
    assert sorted(p.name for p in model_dir.iterdir()) == [".staging-recent", "1", "2"]


def test_the_loser_of_a_publish_race_is_renumbered_before_it_is_published(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    renumbered: list[int] = []

    def build(staging: Path, version: int) -> dict[str, Any]:
        (staging / "title.txt").write_text(f"m v{version}")
        repo.publish("m", build_file("the winner"))  # another publisher takes this version first
        return {"name": "m"}

    def renumber(staging: Path, version: int, metadata: dict[str, Any]) -> None:
        assert metadata["version"] == version
        renumbered.append(version)
        (staging / "title.txt").write_text(f"m v{version}")

    version, path = repo.publish("m", build, renumber=renumber)
    assert (version, renumbered) == (2, [2])
    assert (path / "title.txt").read_text() == "m v2"
    metadata = read_metadata(path)
    assert metadata["version"] == 2
    verify_files(path, metadata)  # the checksums are those of the rewritten files
    assert (tmp_path / "m" / "1" / "model.bin").read_text() == "the winner"


def test_the_metadata_has_a_checksum_file_written_with_it(tmp_path: Path) -> None:
    _, path = ModelRepository(tmp_path).publish("m", build_file("x"))
    data = (path / "metadata.json").read_bytes()
    assert (path / "metadata.json.sha256").read_text() == \
        f"{hashlib.sha256(data).hexdigest()}  metadata.json\n"
    assert sorted(json.loads(data)["files"]) == ["model.bin"]
    assert subprocess.run(["sha256sum", "--check", "--quiet", "metadata.json.sha256"], cwd=path,
                          check=False).returncode == 0


def test_every_published_file_is_recorded_and_read_back_checked(tmp_path: Path) -> None:
    # What the gate relies on: the publisher records the SHA-256 and size of every file (nested
    # ones included), and Metadata.read_file gives back exactly the bytes it checked.
    from digitserve.errors import CorruptVersionError
    from digitserve.metadata import Metadata

    contents = {"model.keras": b"keras archive", "check_set.npz": b"check set",
                "model.tflite": b"flatbuffer", "report/summary.md": b"# report"}

    def build(staging: Path, version: int) -> dict[str, Any]:
        for rel, data in contents.items():
            (staging / rel).parent.mkdir(exist_ok=True)
            (staging / rel).write_bytes(data)
        return {"name": "m"}

    _, path = ModelRepository(tmp_path).publish("m", build)
    metadata = Metadata.read(path)
    assert metadata.files is not None
    assert {rel: (e.sha256, e.bytes) for rel, e in metadata.files.items()} == {
        rel: (hashlib.sha256(data).hexdigest(), len(data)) for rel, data in contents.items()}
    assert {rel: metadata.read_file(path, rel) for rel in contents} == contents
    (path / "check_set.npz").write_bytes(b"check seT")
    with pytest.raises(CorruptVersionError) as info:
        metadata.read_file(path, "check_set.npz")
    assert str(info.value) == (
        f"{path}/check_set.npz: sha256 is {hashlib.sha256(b'check seT').hexdigest()}, "
        f"metadata.json says {hashlib.sha256(b'check set').hexdigest()}; the file changed after "
        "publishing: republish the version")
    (path / "extra.bin").write_bytes(b"not published")
    with pytest.raises(CorruptVersionError) as info:
        metadata.read_file(path, "extra.bin")
    assert str(info.value) == f"{path}/metadata.json: no checksum for extra.bin"
    assert metadata.read_file(path, "extra.bin", required=False) == b"not published"
    (path / "model.tflite").unlink()
    with pytest.raises(CorruptVersionError) as info:
        metadata.read_file(path, "model.tflite")
    assert str(info.value) == f"{path}/model.tflite: missing"
