"""The versioned model repository: ``ROOT/NAME/VERSION/`` with ``model.keras``, ``metadata.json``
(and its checksum, ``metadata.json.sha256``) and ``report/``. Publishing is atomic (a staged
directory renamed into place); reading needs no TensorFlow."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
METADATA_CHECKSUM_FILE = "metadata.json.sha256"  # `sha256sum -c` format; written last
MODEL_FILE = "model.keras"
LITERT_FILE = "model.tflite"  # the model as LiteRT runs it, served without TensorFlow
CHECK_SET_FILE = "check_set.npz"  # uint8 images and labels the server checks a version on
REPORT_DIR = "report"
_STAGING_PREFIX = ".staging-"
STAGING_MAX_AGE = 3600.0
"""Seconds after its last write a ``.staging-*`` directory that no publisher holds locked is taken
for a killed publisher's and removed by the next publish. A live publisher holds an exclusive
flock on its staging directory (the guarantee on one host) and writes into it at each step of its
build; the age also covers publishers that take no lock (older trainers, other hosts over NFS)."""
_VERSION_NAME = re.compile(r"[1-9][0-9]*")  # ASCII digits only, no leading zero: str(int(name))


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


def is_version_name(name: str) -> bool:
    """Whether ``name`` is a version directory's name: a canonical positive integer (``1``,
    ``12``; not ``012``, ``+1`` or ``²``), so each version has exactly one directory."""
    return _VERSION_NAME.fullmatch(name) is not None


class ModelRepository:
    """A directory of models, each a directory of integer-numbered versions."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._ignored: set[Path] = set()  # entries already reported as not versions

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, ascending; [] if there are none. Only directories
        named as canonical integers are versions; anything else but hidden entries (staging) is
        ignored with a warning, once per entry."""
        _check_name(name)
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        found = []
        for entry in model_dir.iterdir():
            if is_version_name(entry.name) and entry.is_dir():
                found.append(int(entry.name))
            elif not entry.name.startswith(".") and entry not in self._ignored:
                self._ignored.add(entry)
                logger.warning(
                    "ignoring %s: not a version directory (versions are directories named "
                    "1, 2, 3, ... without leading zeros)", entry,
                )
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

    def publish(
        self,
        name: str,
        build: Callable[[Path, int], dict[str, Any]],
        renumber: Callable[[Path, int, dict[str, Any]], None] | None = None,
    ) -> tuple[int, Path]:
        """Publishes a new version of ``name``.

        ``build(staging_dir, version)`` writes the version's files into ``staging_dir`` and returns
        its metadata; the metadata gets the checksums of every file and is written last (then its
        own checksum), then the directory is renamed into place, so readers see a complete version
        or none. Concurrent publishers each get their own version number: one that loses the race
        for ``version`` publishes as the next free one, after ``renumber(staging_dir, version,
        metadata)`` (when given) has rewritten whatever of its files names the version.
        Staging directories that killed publishers left behind are removed first
        (:meth:`remove_stale_staging`).
        """
        _check_name(name)
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_staging(name)
        staging = model_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            with _locked(staging):
                version = max(self.versions(name), default=0) + 1
                metadata = build(staging, version)
                built = version
                while True:
                    metadata["version"] = version
                    if version != built and renumber is not None:
                        renumber(staging, version, metadata)
                        built = version
                    _write_metadata(staging, metadata)
                    fsync_path(staging)
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

    def remove_stale_staging(self, name: str, max_age: float = STAGING_MAX_AGE) -> list[Path]:
        """Removes the ``.staging-*`` directories of ``name`` that no publisher holds locked and
        whose newest entry is older than ``max_age`` seconds (left by killed publishers); returns
        them."""
        _check_name(name)
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        removed = []
        now = time.time()
        for entry in model_dir.iterdir():
            if not entry.name.startswith(_STAGING_PREFIX) or not entry.is_dir():
                continue
            try:
                age = now - _newest_mtime(entry)
                if age <= max_age:
                    continue
                with _locked(entry, wait=False):
                    shutil.rmtree(entry)
            except BlockingIOError:
                continue  # a live publisher holds it
            except OSError as exc:  # gone meanwhile (renamed or removed by another), or not ours
                logger.debug("left %s: %s", entry, exc)
                continue
            logger.warning("removed %s, a staging directory last written %.0fs ago "
                           "(a publisher was killed)", entry, age)
            removed.append(entry)
        return removed


@contextlib.contextmanager
def _locked(directory: Path, wait: bool = True) -> Iterator[None]:
    """Holds an exclusive flock on ``directory`` (released when the holder dies);
    BlockingIOError at once when ``wait`` is False and another holds it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def _newest_mtime(directory: Path) -> float:
    """The latest modification time of ``directory`` and of everything under it."""
    newest = directory.stat().st_mtime
    for root, dirs, files in os.walk(directory):
        for entry in (*dirs, *files):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, entry)).st_mtime)
    return newest


_METADATA_NAMES = {METADATA_FILE, METADATA_CHECKSUM_FILE}


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in _METADATA_NAMES:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    metadata["files"] = files
    data = (json.dumps(metadata, indent=2, sort_keys=False) + "\n").encode("utf-8")
    _write_atomically(directory / METADATA_FILE, data)
    write_metadata_checksum(directory)


def write_metadata_checksum(directory: Path) -> None:
    """Writes ``metadata.json.sha256`` for the directory's ``metadata.json`` (the publisher does,
    last; ``sha256sum -c metadata.json.sha256`` checks it)."""
    digest = sha256_file(directory / METADATA_FILE)
    _write_atomically(directory / METADATA_CHECKSUM_FILE,
                      f"{digest}  {METADATA_FILE}\n".encode("ascii"))


def fsync_path(path: Path) -> None:
    """Flushes a file's or a directory's entry to disk (for atomic renames that survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(version_dir: Path) -> dict[str, Any]:
    """The parsed metadata.json of a version directory, checked against ``metadata.json.sha256``
    when the version has one (versions published before it have none: see
    :func:`metadata_checksummed`); CorruptVersionError if unreadable or if it differs."""
    path = version_dir / METADATA_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CorruptVersionError(f"{path}: missing") from exc
    except OSError as exc:
        raise CorruptVersionError(f"{path}: unreadable ({exc})") from exc
    expected = _recorded_metadata_checksum(version_dir)
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CorruptVersionError(
                f"{path}: sha256 {actual} differs from {expected} recorded in "
                f"{METADATA_CHECKSUM_FILE} (the metadata was changed after publishing)"
            )
    try:
        metadata = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise CorruptVersionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise CorruptVersionError(f"{path}: expected a JSON object")
    return metadata


def metadata_checksummed(version_dir: Path) -> bool:
    """Whether the version has a ``metadata.json.sha256`` (all but versions published before the
    publisher wrote one)."""
    return (version_dir / METADATA_CHECKSUM_FILE).is_file()


def _recorded_metadata_checksum(version_dir: Path) -> str | None:
    path = version_dir / METADATA_CHECKSUM_FILE
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptVersionError(f"{path}: unreadable ({exc})") from exc
    fields = text.split()
    if len(fields) != 2 or fields[1].lstrip("*") != METADATA_FILE \
            or re.fullmatch(r"[0-9a-f]{64}", fields[0]) is None:
        raise CorruptVersionError(
            f"{path}: expected one line '<sha256 hex>  {METADATA_FILE}', found {text[:100]!r}"
        )
    return fields[0]


def verify_files(version_dir: Path, metadata: dict[str, Any], only: list[str] | None = None) -> None:
    """Checks files against the checksums in the metadata (all of them, or those in ``only``);
    CorruptVersionError names the first file that is missing or differs."""
    files = metadata.get("files")
    recorded = None
    if isinstance(files, dict):
        recorded = {rel: entry.get("sha256") if isinstance(entry, dict) else None
                    for rel, entry in files.items()}
    verify_checksums(version_dir, recorded, only)


def verify_checksums(version_dir: Path, recorded: Mapping[str, str | None] | None,
                     only: list[str] | None = None) -> None:
    """Checks files against ``recorded`` SHA-256s (None: the metadata has no ``files``), all of
    them or those in ``only``; CorruptVersionError names the first file missing or differing."""
    if recorded is None:
        raise CorruptVersionError(f"{version_dir / METADATA_FILE}: no 'files' checksums")
    for rel in only if only is not None else sorted(recorded):
        expected = recorded.get(rel)
        if not isinstance(expected, str):
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: no checksum for {rel}")
        path = version_dir / rel
        if not path.is_file():
            raise CorruptVersionError(f"{path}: missing")
        actual = sha256_file(path)
        if actual != expected:
            raise CorruptVersionError(
                f"{path}: sha256 {actual} differs from {expected} recorded in metadata"
            )
