"""Where served models come from: the repository's versions, each loaded only after it passes the
quality gate (metadata checksum, a check set that fits the metadata, loads, declared output shape,
probabilities sum to 1, check-set accuracy ≥ a floor)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from digitserve.inference import (
    CheckSet,
    Model,
    ModelSpec,
    check_consistency,
    load_version,
    read_check_set,
)
from digitserve.metadata import METADATA_CHECKSUM_FILE, METADATA_FILE, Metadata, metadata_checksummed
from digitserve.repository import (
    CHECK_SET_FILE,
    CorruptVersionError,
    ModelNotFoundError,
    ModelRepository,
    RepositoryError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# What a version directory looks like from outside, cheaply: (name, size, mtime in ns) per entry.
Fingerprint = tuple[tuple[str, int, int], ...]


class QualityGateError(RepositoryError):
    """Raised when a version loads but does not answer well enough to be served."""


class ModelSource(Protocol):
    """Published versions and a way to load one (checked and warmed up)."""

    # True when new versions can appear (the server watches it for them: hot reload); False for a
    # source whose versions are fixed once it is made.
    watchable: bool

    def versions(self) -> list[int]: ...

    def load(self, version: int) -> Model: ...

    def fingerprint(self, version: int) -> Fingerprint | None: ...


def check_quality(model: Model, check_set: CheckSet, path: Path, min_accuracy: float) -> float:
    """Accuracy on the version's check set (read_check_set; ``path`` names it in messages);
    raises QualityGateError below ``min_accuracy``."""
    x, labels = check_set.images, check_set.labels
    check_consistency(model.spec, check_set, path)
    probs = model.predict(x)
    if probs.shape != (x.shape[0], len(model.spec.labels)):
        raise QualityGateError(
            f"model outputs shape {probs.shape}, expected {(x.shape[0], len(model.spec.labels))}"
        )
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise QualityGateError("model outputs do not sum to 1 on the check set")
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    if accuracy < min_accuracy:
        raise QualityGateError(
            f"check-set accuracy {accuracy:.4f} on {x.shape[0]} images is below the floor {min_accuracy:.4f}"
        )
    return accuracy


class RepositorySource:
    """Versions of one model in a repository, loaded by load_version and gated."""

    watchable = True  # versions are published while the server runs

    def __init__(self, root: Path, name: str, min_accuracy: float, inference: str = "auto",
                 *, allow_missing_check_set: bool = False) -> None:
        self.repository = ModelRepository(root)
        self.name = name
        self.min_accuracy = min_accuracy
        self.inference = inference
        self.allow_missing_check_set = allow_missing_check_set

    def versions(self) -> list[int]:
        """Published versions; ModelNotFoundError when there are none."""
        versions = self.repository.versions(self.name)
        if not versions:
            raise ModelNotFoundError(
                f"model {self.name!r} has no published version in {self.repository.root}"
            )
        return versions

    def __str__(self) -> str:
        return f"{self.repository.root}/{self.name}"

    def fingerprint(self, version: int) -> Fingerprint | None:
        """Names, sizes and modification times of the version directory's entries (no file is
        read): it changes when a file is added, completed or replaced. None when the directory
        is gone."""
        try:
            with os.scandir(self.repository.version_dir(self.name, version)) as entries:
                return tuple(sorted(
                    (entry.name, (st := entry.stat(follow_symlinks=False)).st_size, st.st_mtime_ns)
                    for entry in entries
                ))
        except FileNotFoundError:
            return None

    def load(self, version: int) -> Model:
        """The version, loaded and past the gate; RepositoryError says why it is refused. The
        checks that need no model run first (metadata and its checksum, name and version, the
        check set and its agreement with the metadata), so a refused version never costs a
        TensorFlow import where the LiteRT path serves."""
        version_dir = self.repository.version_dir(self.name, version)
        # checked against metadata.json.sha256 if present
        spec = ModelSpec.from_metadata(Metadata.read(version_dir))
        if spec.name != self.name or spec.version != version:
            raise CorruptVersionError(
                f"{version_dir}: metadata says {spec.name!r} version {spec.version}"
            )
        if not metadata_checksummed(version_dir):
            logger.warning("%s has no %s (published before metadata was checksummed): its "
                           "metadata is served unverified", version_dir, METADATA_CHECKSUM_FILE)
        check_set = read_check_set(version_dir)  # read once: the inference path's probe, the gate
        if check_set is None:
            if not self.allow_missing_check_set:
                raise QualityGateError(
                    f"{version_dir / CHECK_SET_FILE} is missing, so the accuracy floor cannot be "
                    "checked: publish the version with its check set, or start the server with "
                    "--allow-missing-check-set to serve it unchecked"
                )
            logger.warning("%s has no %s: serving it unchecked (--allow-missing-check-set)",
                           version_dir, CHECK_SET_FILE)
        model = load_version(version_dir, inference=self.inference, check_set=check_set)
        if model.spec != spec:
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: changed while loading")
        if check_set is None:
            return model
        accuracy = check_quality(model, check_set, version_dir / CHECK_SET_FILE, self.min_accuracy)
        logger.info("version %d passed the quality gate: check-set accuracy %.4f", version, accuracy)
        return model


class StaticSource:
    """One model from a loader function (tests, embedding): no versions to watch."""

    watchable = False

    def __init__(self, loader: Callable[[], Model]) -> None:
        self._loader = loader

    def versions(self) -> list[int]:
        return [0]  # the one model, whatever its version

    def __str__(self) -> str:
        return "a loader function"

    def load(self, version: int) -> Model:
        return self._loader()

    def fingerprint(self, version: int) -> Fingerprint | None:
        return None  # nothing on disk to change


class RepositoryTimeoutError(RepositoryError):
    """A repository read did not return within the timeout (a hung volume, a FIFO, a lost NFS
    server); the read goes on in its thread, and the same read is not started again until it
    returns."""


@dataclass
class _Attempt:
    what: str
    started: float  # time.monotonic()
    tag: object = None  # what the caller read against (a fingerprint): a late result is kept for it
    timed_out: bool = False


@dataclass
class _Late:
    tag: object
    result: object
    error: BaseException | None


class RepositoryReads:
    """Runs blocking repository reads (a listing, loading a version) each in a daemon thread of
    its own, awaited for at most ``timeout`` seconds, so the event loop never waits on the disk and
    a hung read never holds up shutdown (the default executor's threads are joined at exit; these
    are not).

    At most one attempt per key (``list``, ``load 3``) runs at a time: while one that timed out
    has not returned, a new run of that key fails at once with RepositoryTimeoutError instead of
    starting one more thread that would hang the same way. A read that returns after its timeout
    is logged and, for a tagged read, its outcome kept: the next run of the key with the same
    ``tag`` (the version directory's fingerprint: the files it read have not changed) gets it
    without reading again, so a load merely slower than the timeout still succeeds on the next
    look."""

    def __init__(self, timeout: float, on_timeout: Callable[[str], None] | None = None) -> None:
        self.timeout = timeout
        self._on_timeout = on_timeout
        self._running: dict[str, _Attempt] = {}
        self._late: dict[str, _Late] = {}

    def busy(self, key: str) -> bool:
        """Whether a read of ``key`` is still running (one that timed out and has not returned)."""
        return key in self._running

    @property
    def hung(self) -> int:
        """Reads that ran past their timeout and have not returned yet."""
        return sum(1 for attempt in self._running.values() if attempt.timed_out)

    async def run(self, key: str, what: str, read: Callable[[], T], tag: object = None) -> T:
        """``read()`` in a daemon thread; its result, or its exception, or RepositoryTimeoutError
        after ``timeout`` seconds (``what`` says what was read, for the message and the log)."""
        running = self._running.get(key)
        if running is not None:
            raise RepositoryTimeoutError(
                f"{running.what} has not returned {time.monotonic() - running.started:.1f}s after "
                f"it started (timeout {self.timeout:g}s); not retried until it returns"
            )
        late = self._late.pop(key, None)
        if late is not None and late.tag == tag:
            if late.error is not None:
                raise late.error
            return late.result  # type: ignore[return-value]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        attempt = self._running[key] = _Attempt(what, time.monotonic(), tag)

        def settle(result: T | None, error: BaseException | None) -> None:
            if self._running.get(key) is attempt:
                del self._running[key]
            if future.done():  # timed out, or the awaiting task was cancelled (shutdown)
                if attempt.timed_out:
                    if tag is not None:  # untagged reads (listings) are simply read again
                        self._late[key] = _Late(tag, result, error)
                    logger.warning("%s returned %.1fs after it started, past the %gs timeout (%s); "
                                   "the next look %s",
                                   what, time.monotonic() - attempt.started, self.timeout,
                                   "failed" if error is not None else "succeeded",
                                   "reads again" if tag is None else "takes this outcome")
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]
        def target() -> None:
            try:
                outcome: tuple[T | None, BaseException | None] = (read(), None)
            except BaseException as exc:  # handed to the awaiting task
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, *outcome)

        threading.Thread(target=target, name=f"repository {key}", daemon=True).start()
        try:
            await asyncio.wait((future,), timeout=self.timeout)
        finally:
            if not future.done():  # timed out, or cancelled: the thread goes on alone
                future.cancel()
        if future.cancelled():
            attempt.timed_out = True
            seconds = time.monotonic() - attempt.started
            logger.error("repository read timed out: %s did not return within %gs (%.1fs); "
                         "skipped for now, retried once it returns", what, self.timeout, seconds)
            if self._on_timeout is not None:
                self._on_timeout(key.split(" ", 1)[0])
            raise RepositoryTimeoutError(
                f"{what} did not return within the {self.timeout:g}s repository timeout "
                "(a hung read?); retried once it returns"
            )
        return future.result()
