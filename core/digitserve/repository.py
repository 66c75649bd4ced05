"""The versioned model repository: ``ROOT/NAME/VERSION/`` with ``model.keras``, ``metadata.json``
(and ``metadata.json.sha256``) and ``report/``. Publishing is atomic (a staged directory renamed
into place); reading needs no TensorFlow. Its errors (``digitserve.errors``) are exported here."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from digitserve.errors import CorruptVersionError as CorruptVersionError
from digitserve.errors import ModelNotFoundError as ModelNotFoundError
from digitserve.errors import RepositoryError as RepositoryError
from digitserve.metadata import read_metadata, stamp_version, write_metadata

logger = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
LITERT_FILE = "model.tflite"  # the model as LiteRT runs it, served without TensorFlow
CHECK_SET_FILE = "check_set.npz"  # uint8 images and labels the server checks a version on
REPORT_DIR = "report"
_STAGING_PREFIX = ".staging-"
STAGING_MAX_AGE = 3600.0
"""Seconds after its last write an unlocked ``.staging-*`` directory is taken for a killed
publisher's and removed by the next publish. A live publisher holds a flock on it (one host); the
age covers publishers that take no lock (older trainers, other hosts over NFS)."""
LOST_AND_FOUND = "lost+found"  # a volume's own directory, no model's: never reported
_VERSION_NAME = re.compile(r"[1-9][0-9]*")  # ASCII digits only, no leading zero: str(int(name))


_warned: set[str] = set()  # paths warn_once has warned about, in this process


def warn_once(path: str, message: str) -> None:
    """Logs ``message`` as a warning the first time it is said of ``path`` in this process."""
    if path not in _warned:
        _warned.add(path)
        logger.warning("%s", message)


def _check_name(name: str) -> None:
    if (problem := model_name_error(name)) is not None:
        raise RepositoryError(problem)


# A model's directory is named like this (not hidden, not a version number, not ``lost+found``).
MODEL_NAME_LIMIT = 128
MODEL_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MODEL_NAME_LIMIT - 1}}}")


def model_name_error(name: str) -> str | None:
    """Why a model named ``name`` would never be served, in one line; None when it would be. The
    one rule of the trainer (before it trains), the server's flags and its repository listing."""
    if is_model_name(name):
        return None
    rule = "letters, digits, '.', '_', '-', starting with a letter or digit"
    if is_version_name(name):
        rule += "; a number alone names a version"
    elif len(name) > MODEL_NAME_LIMIT and MODEL_NAME.fullmatch(name[:MODEL_NAME_LIMIT]):
        rule += f"; at most {MODEL_NAME_LIMIT} characters, not {len(name)}"
    return f"model name {name!r} is not a model directory's name ({rule})"


def is_model_name(name: str) -> bool:
    """Whether a directory of the repository named ``name`` is a model's."""
    return MODEL_NAME.fullmatch(name) is not None and not is_version_name(name)


def is_version_name(name: str) -> bool:
    """Whether ``name`` is a version directory's: a canonical positive integer (not ``012``, ``+1``
    or ``²``), so each version has exactly one directory."""
    return _VERSION_NAME.fullmatch(name) is not None


MIN_FREE_BYTES = 64 * 2**20
"""Free space a publish needs at least (a version of the largest preset, its report and check set
take a few MiB); checked before training, not after."""


def publish_error(root: str | os.PathLike[str], name: str) -> str | None:
    """Why a version of ``name`` could not be published under ``root`` (``--model-repo``), in one
    line; None when it could: ROOT/NAME is a directory or can be created (no file in the way),
    this process may write there, and the file system has MIN_FREE_BYTES free. Nothing is left
    behind (the write check is a directory made and removed)."""
    root = Path(root)
    flag = f"--model-repo {root}"
    existing = root / name
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    named = "it" if existing == root else str(existing)
    if not existing.is_dir():
        kind = "a file" if existing.is_file() else "not a directory"
        if existing == root:
            return (f"{flag}: {kind}; give the model repository's directory (it holds NAME/VERSION/) "
                    "or a path to create")
        return (f"{flag}: {existing} is {kind}, so {root / name} cannot be created; remove it or give "
                "another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        what = f"cannot write in {named}" if existing in (root, root / name) else \
            f"cannot be created in {existing}"
        return (f"{flag}: {what}: {error.strerror or error}; give a directory this user may write, or "
                "fix its permissions")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        return (f"{flag}: {free / 2**20:.1f} MiB free on its file system, less than the "
                f"{MIN_FREE_BYTES // 2**20} MiB a version needs; free some space or give another path")
    return None


class ModelRepository:
    """A directory of models, each a directory of integer-numbered versions."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._ignored: set[str] = set()  # entries already reported as not versions

    def models(self) -> list[str]:
        """The model directories' names, sorted (those without a version too); [] when the
        repository is missing."""
        return sorted(self.model_dirs())

    def model_dirs(self) -> dict[str, bool]:
        """Each model directory's name and whether it holds a version directory, from one listing
        of the root and of each model directory; {} when the repository is missing."""
        return self.listing()[0]

    def listing(self) -> tuple[dict[str, bool], dict[str, str]]:
        """model_dirs, and from the same listing each other directory of the root with why it is
        not a model's (its name; hidden ones and a volume's ``lost+found`` are left out)."""
        try:
            with os.scandir(self.root) as entries:
                dirs = [e for e in entries if not e.name.startswith(".") and e.name != LOST_AND_FOUND
                        and self.followed_dir(e)]
        except (FileNotFoundError, NotADirectoryError):
            return {}, {}
        models = {e.name: self._holds_a_version(Path(e.path)) for e in dirs if is_model_name(e.name)}
        others = {e.name: problem for e in dirs if (problem := model_name_error(e.name)) is not None}
        return models, others

    def _holds_a_version(self, model_dir: Path) -> bool:
        try:
            with os.scandir(model_dir) as entries:
                return any(is_version_name(e.name) and self.followed_dir(e) for e in entries)
        except OSError:  # gone meanwhile, unreadable: nothing to serve from it
            return False

    def followed_dir(self, entry: os.DirEntry[str]) -> bool:
        """Whether an entry is a directory to serve from: a directory, or a symlink to one inside
        the repository root (a volume mounted there). A loop, a dangling symlink or one out of the
        root is skipped with one warning per process (warn_once); the rest serves on."""
        try:
            if not entry.is_symlink():
                return entry.is_dir(follow_symlinks=False)
        except OSError:
            return False
        return self._link_followed(entry.path)

    def _link_followed(self, link: str) -> bool:
        try:
            target = Path(os.path.realpath(link, strict=True))  # OSError: a loop, dangling
        except OSError as error:
            warn_once(link, f"ignoring {link}: a symlink that cannot be followed "
                      f"({error.strerror or error}); fix or remove it")
            return False
        root = Path(os.path.realpath(self.root))
        if target == root or root not in target.parents:
            where = "the repository itself" if target == root else "outside the repository"
            warn_once(link, f"ignoring {link}: a symlink to {target}, {where} {root}; only "
                      "symlinks to directories inside the repository are followed")
            return False
        return target.is_dir()

    def _model_dir_followed(self, model_dir: Path) -> bool:
        """Whether ``model_dir`` (ROOT/NAME) is a directory to list, as followed_dir says."""
        try:
            mode = os.lstat(model_dir).st_mode
        except OSError:
            return False
        return self._link_followed(str(model_dir)) if stat.S_ISLNK(mode) else stat.S_ISDIR(mode)

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name``, ascending; [] if there are none. Entries not named as
        canonical integers (hidden ones apart) are ignored with one warning each."""
        _check_name(name)
        model_dir = self.root / name
        if not self._model_dir_followed(model_dir):
            return []
        try:
            with os.scandir(model_dir) as entries:
                listed = list(entries)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for entry in listed:
            if is_version_name(entry.name) and self.followed_dir(entry):
                found.append(int(entry.name))
            elif not entry.name.startswith(".") and entry.path not in self._ignored \
                    and not (is_version_name(entry.name) and entry.is_symlink()):  # warned
                self._ignored.add(entry.path)
                logger.warning("ignoring %s: not a version directory (versions are directories named "
                               "1, 2, 3, ... without leading zeros)", entry.path)
        return sorted(found)

    def latest(self, name: str) -> int:
        """The newest version of ``name``; ModelNotFoundError if none is published."""
        if not (versions := self.versions(name)):
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
        """Publishes a new version of ``name``: ``build(staging_dir, version)`` writes its files and
        returns its metadata, which gets every file's checksum and is written last; the directory
        is then renamed into place, so readers see a complete version or none. A publisher that
        loses the race for ``version`` publishes as the next free one, after ``renumber(staging_dir,
        version, metadata)`` rewrote what names the version. Stale staging directories go first."""
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
                    stamp_version(metadata, version)
                    if version != built and renumber is not None:
                        renumber(staging, version, metadata)
                        built = version
                    write_metadata(staging, metadata)
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
        """Removes and returns ``name``'s unlocked ``.staging-*`` directories whose newest entry is
        older than ``max_age`` seconds (left by killed publishers)."""
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
    """Holds an exclusive flock on ``directory``; BlockingIOError at once unless ``wait``."""
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


def fsync_path(path: Path) -> None:
    """Flushes a file's or a directory's entry to disk (for atomic renames that survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

