"""The versioned model repository: ``ROOT/NAME/VERSION/`` with ``model.keras``, ``metadata.json``
and ``report/``. Publishing is atomic (a staged directory renamed into place); reading needs no
TensorFlow."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
MODEL_FILE = "model.keras"
LITERT_FILE = "model.tflite"  # the model as LiteRT runs it, served without TensorFlow
CHECK_SET_FILE = "check_set.npz"  # uint8 images and labels the server checks a version on
REPORT_DIR = "report"
FORMAT_VERSION = 1
_STAGING_PREFIX = ".staging-"


class RepositoryError(Exception):
    """Base class of the model repository's errors."""


class ModelNotFoundError(RepositoryError):
    """Raised when a model name, or a version of it, does not exist in the repository."""


class CorruptVersionError(RepositoryError):
    """Raised when a published version is unreadable: bad metadata, or a file whose checksum
    differs from the one recorded in its metadata."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise RepositoryError(f"invalid model name {name!r}: use letters, digits, '-', '_' or '.'")


class ModelRepository:
    """A directory of models, each a directory of integer-numbered versions."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, ascending; [] if there are none."""
        _check_name(name)
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        found = []
        for entry in model_dir.iterdir():
            if entry.name.isdigit() and entry.is_dir() and int(entry.name) > 0:
                found.append(int(entry.name))
        return sorted(found)

    def latest(self, name: str) -> int:
        """The newest version of ``name``; ModelNotFoundError if none is published."""
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"model {name!r} has no published version in {self.root}")
        return versions[-1]

    def version_dir(self, name: str, version: int) -> Path:
        """The directory of a published version; ModelNotFoundError if it does not exist."""
        _check_name(name)
        path = self.root / name / str(version)
        if version <= 0 or not path.is_dir():
            raise ModelNotFoundError(f"model {name!r} has no version {version} in {self.root}")
        return path

    def read_metadata(self, name: str, version: int) -> dict[str, Any]:
        """The parsed metadata.json of a version."""
        return read_metadata(self.version_dir(name, version))

    def publish(self, name: str, build: Callable[[Path, int], dict[str, Any]]) -> tuple[int, Path]:
        """Publishes a new version of ``name``.

        ``build(staging_dir, version)`` writes the version's files into ``staging_dir`` and returns
        its metadata; the metadata gets the checksums of every file and is written last, then the
        directory is renamed into place, so readers see a complete version or none. Concurrent
        publishers each get their own version number.
        """
        _check_name(name)
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = model_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            version = max(self.versions(name), default=0) + 1
            metadata = build(staging, version)
            while True:
                metadata["version"] = version
                _write_metadata(staging, metadata)
                target = model_dir / str(version)
                try:
                    # rename() onto an existing non-empty directory fails: someone else won it.
                    os.rename(staging, target)
                except OSError:
                    if not target.exists():
                        raise
                    version = max(self.versions(name), default=version) + 1
                    continue
                fsync_path(model_dir)
                logger.info("published model %s version %d at %s", name, version, target)
                return version, target
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != METADATA_FILE:
            files[path.relative_to(directory).as_posix()] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
    metadata["files"] = files
    tmp = directory / (METADATA_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(metadata, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / METADATA_FILE)


def fsync_path(path: Path) -> None:
    """Flushes a file's or a directory's entry to disk (for atomic renames that survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(version_dir: Path) -> dict[str, Any]:
    """The parsed metadata.json of a version directory; CorruptVersionError if unreadable."""
    path = version_dir / METADATA_FILE
    try:
        with open(path, encoding="utf-8") as fh:
            metadata = json.load(fh)
    except FileNotFoundError as exc:
        raise CorruptVersionError(f"{path}: missing") from exc
    except (OSError, ValueError) as exc:
        raise CorruptVersionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise CorruptVersionError(f"{path}: expected a JSON object")
    return metadata


def verify_files(version_dir: Path, metadata: dict[str, Any], only: list[str] | None = None) -> None:
    """Checks files against the checksums in the metadata (all of them, or those in ``only``);
    CorruptVersionError names the first file that is missing or differs."""
    files = metadata.get("files")
    if not isinstance(files, dict):
        raise CorruptVersionError(f"{version_dir / METADATA_FILE}: no 'files' checksums")
    for rel in only if only is not None else sorted(files):
        entry = files.get(rel)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: no checksum for {rel}")
        path = version_dir / rel
        if not path.is_file():
            raise CorruptVersionError(f"{path}: missing")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise CorruptVersionError(
                f"{path}: sha256 {actual} differs from {entry['sha256']} recorded in metadata"
            )
