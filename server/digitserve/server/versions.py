"""Where served models come from: the repository's versions, each loaded only after it passes the
quality gate (the SHA-256 of every file it reads: metadata, check set, model; a check set that
fits the metadata, loads, declared output shape, outputs are probabilities, check-set accuracy
reproduces the trainer's recorded figure; the operator's optional rules: a floor, a largest
regression from the version serving)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

from digitserve.inference import (
    CheckSet,
    Model,
    ModelSpec,
    check_consistency,
    load_version,
    read_check_set,
)
from digitserve.metadata import (
    METADATA_CHECKSUM_FILE,
    METADATA_FILE,
    CheckSetInfo,
    Metadata,
    metadata_checksummed,
)
from digitserve.repository import (
    CHECK_SET_FILE,
    CorruptVersionError,
    ModelNotFoundError,
    ModelRepository,
    RepositoryError,
    is_version_name,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# What a version directory looks like from outside, cheaply: (name, size, mtime in ns) per entry.
Fingerprint = tuple[tuple[str, int, int], ...]


class QualityGateError(RepositoryError):
    """Raised when a version loads but does not answer well enough to be served."""


class NothingPublishedError(ModelNotFoundError):
    """The repository is there, and the model could be published into it, but no version of it
    is yet: an empty directory, a fresh volume, other models only, the model's directory without
    a version. A server waits for one (unless --exit-if-no-model)."""


class Gated(NamedTuple):
    """A version past the gate: the model, and the check-set accuracy the gate measured (None: it
    had no check set, --allow-missing-check-set)."""

    model: Model
    accuracy: float | None


class ModelSource(Protocol):
    """Published versions and a way to load one past the gate; it keeps no state (the registry
    holds each version's and hands the gate its rules and baseline)."""

    watchable: bool  # new versions can appear: the server watches for them (hot reload)

    def versions(self) -> list[int]: ...

    def load(self, version: int, rules: GateRules = ..., baseline: Baseline | None = None) -> Gated:
        """The version, past the gate with ``rules``; ``baseline``: the version now serving, which
        --max-regression compares it with (None: nothing serves yet)."""
        ...

    def fingerprint(self, version: int) -> Fingerprint | None: ...


REPRODUCE_IMAGES = 1
"""How many check-set images the gate's count of correct answers may differ from the trainer's
by. The served path's probabilities agree with ``model.predict`` to the version's tolerance
(checked at load, about 1e-6), so an answer can change only on an image whose top two
probabilities are closer than that: on the check sets measured (MNIST, 500 images, accuracy
0.988; a seed-preset model at 0.162; the tests' tiny model), LiteRT and TensorFlow both gave the
trainer's figure exactly, 0 answers changed, the closest top-two margin 2.1e-4 against a largest
difference of 1.7e-6. One image leaves room for one true near-tie on another CPU's kernels; a
check set, model or figure that is not what was trained differs by more."""


@dataclass(frozen=True)
class GateRules:
    """What a version's check-set accuracy must meet besides reproducing the trainer's figure:
    the operator's optional rules (``--min-check-accuracy``: a floor, 0 = off;
    ``--max-regression``: at most this much below the version now serving, 1 = off)."""

    min_accuracy: float = 0.0
    max_regression: float = 1.0


@dataclass(frozen=True)
class Baseline:
    """The version now serving, as the regression rule compares with it."""

    version: int
    accuracy: float


def check_quality(model: Model, check_set: CheckSet, path: Path, rules: GateRules = GateRules(),
                  recorded: CheckSetInfo | None = None, baseline: Baseline | None = None) -> float:
    """Accuracy on the version's check set (read_check_set; ``path`` names it in messages).
    QualityGateError when the outputs are not probabilities of the declared shape, when the
    accuracy does not reproduce the figure the trainer ``recorded`` (metadata's ``check_set``;
    versions published without it skip this check), or when it breaks one of the operator's
    ``rules`` (against ``baseline``, the version now serving, for ``--max-regression``)."""
    x, labels = check_set.images, check_set.labels
    check_consistency(model.spec, check_set, path)
    probs = model.predict(x)
    if probs.shape != (x.shape[0], len(model.spec.labels)):
        raise QualityGateError(
            f"model outputs shape {probs.shape}, expected {(x.shape[0], len(model.spec.labels))}"
        )
    if not np.all(probs >= 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise QualityGateError("model outputs are not probabilities on the check set (each "
                               "between 0 and 1, summing to 1)")
    n = x.shape[0]
    correct = int((probs.argmax(axis=1) == labels).sum())
    accuracy = float(correct / n)
    measured = f"check-set accuracy {accuracy:.4f} ({correct} of {n} images)"
    if recorded is not None and recorded.accuracy is not None:
        expected = round(recorded.accuracy * n)
        if abs(correct - expected) > REPRODUCE_IMAGES:
            raise QualityGateError(
                f"{measured} does not reproduce the {recorded.accuracy:.4f} ({expected} of {n}) "
                f"the trainer recorded in metadata.json (the gate allows {REPRODUCE_IMAGES} "
                "image of difference): the model, its check set or the figure is not what was "
                "trained; publish the version again"
            )
    if accuracy < rules.min_accuracy:
        raise QualityGateError(
            f"{measured} is below the floor {rules.min_accuracy:.4f} set by --min-check-accuracy"
        )
    if baseline is not None and baseline.accuracy - accuracy > rules.max_regression:
        raise QualityGateError(
            f"{measured} is {baseline.accuracy - accuracy:.4f} below the "
            f"{baseline.accuracy:.4f} of version {baseline.version}, now serving: more than the "
            f"{rules.max_regression:.4f} allowed by --max-regression"
        )
    return accuracy


MAX_LISTED = 8  # models, or versions of one, named in a message; the rest counted


def _versions_text(versions: list[int]) -> str:
    """``version 1``, ``versions 1, 2, 3``, ``versions 1, 2, 3, …, 40 (40 in all)``."""
    if len(versions) == 1:
        return f"version {versions[0]}"
    if len(versions) <= MAX_LISTED:
        return "versions " + ", ".join(map(str, versions))
    return f"versions {', '.join(map(str, versions[:3]))}, …, {versions[-1]} ({len(versions)} in all)"


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a directory, following symlinks; False for a symlink loop (which
    the repository's listing skips with a warning) rather than an error."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _version_dirs(directory: Path, published: bool = False) -> list[int]:
    """The version directories in ``directory`` (``published``: those holding a metadata.json),
    ascending; nothing is logged about other entries."""
    try:
        with os.scandir(directory) as entries:
            found = [int(e.name) for e in entries if is_version_name(e.name) and _is_dir(e)]
    except OSError:
        return []
    if published:
        found = [v for v in found if (directory / str(v) / METADATA_FILE).is_file()]
    return sorted(found)


def repository_error(root: Path, name: str | None = None) -> ModelNotFoundError | None:
    """Why the repository ``root`` (given by ``--model-repo``) has no published version of model
    ``name`` (None: of any model), what is there instead and what to do, in one line; None when
    it has one. The directory is missing, a file, a model's own directory (TF Serving's
    ``--model_base_path`` habit; the line adds ``--model-name`` when it is another model's), empty,
    holds other models, or holds the model without a version yet. NothingPublishedError where
    publishing into ``root`` is what it lacks (a server may wait for that), ModelNotFoundError
    where a flag names the wrong thing (a model name with no directory among other models)."""
    flag = f"--model-repo {root}"
    publish = f"mnist-train train --model-repo {root} --model-name {name or 'NAME'}"
    if not root.exists():
        shown = "" if root.is_absolute() else f" ({root.absolute()})"
        return ModelNotFoundError(
            f"{flag}: no such directory{shown}; give the model repository the trainer "
            f"publishes to, or publish into it ({publish})")
    if not root.is_dir():
        return ModelNotFoundError(
            f"{flag}: not a directory; give the model repository (the directory of NAME/VERSION/)")
    own = _version_dirs(root, published=True)
    if own:
        base = root.name or root.resolve().name
        parent = root.parent if root.name else root.resolve().parent
        also = "" if name is None or base == name else f" --model-name {base}"
        return ModelNotFoundError(
            f"{flag} looks like the directory of model {base!r} (it holds "
            f"{_versions_text(own)} of it), not a repository of models: use "
            f"--model-repo {parent}{also}")
    try:
        with os.scandir(root) as entries:
            everything = list(entries)
        if name is None and ModelRepository(root).models():
            return None
    except OSError as error:
        return ModelNotFoundError(f"{flag}: cannot list it ({error.strerror or error})")
    if name is not None:
        children = sorted(e.name for e in everything if not e.name.startswith(".") and _is_dir(e))
        if name in children:
            return NothingPublishedError(
                f"{flag}: model {name!r} has no published version in {root} ({root / name} holds "
                f"no version directory 1, 2, …); publish one ({publish})")
        models = [(child, versions) for child in children if (versions := _version_dirs(root / child))]
        if models:
            listed = ", ".join(f"{child} ({_versions_text(versions)})"
                               for child, versions in models[:MAX_LISTED])
            more = f" and {len(models) - MAX_LISTED} more" if len(models) > MAX_LISTED else ""
            return ModelNotFoundError(  # a typo: no wait would help, so the server does not start
                f"{flag}: no model {name!r} in it; models there: {listed}{more}; choose one with "
                f"--model-name, or publish {name!r} ({publish})")
    if not everything:
        return NothingPublishedError(
            f"{flag}: the directory is empty: no model is published there yet; publish one ({publish})")
    return NothingPublishedError(
        f"{flag}: no model is published there (no NAME/VERSION/ directories); give the model "
        f"repository the trainer publishes to, or publish into it ({publish})")


def missing_error(root: Path, name: str) -> ModelNotFoundError:
    """repository_error for model ``name``, which the caller found no version of."""
    error = repository_error(root, name)
    assert error is not None  # with a name, never None
    return error


class RepositorySource:
    """Versions of one model in a repository, loaded by load_version and gated."""

    watchable = True  # versions are published while the server runs

    def __init__(self, root: Path, name: str, inference: str = "auto", *,
                 allow_missing_check_set: bool = False) -> None:
        self.repository = ModelRepository(root)
        self.name = name
        self.inference = inference
        self.allow_missing_check_set = allow_missing_check_set

    def versions(self) -> list[int]:
        """Published versions; ModelNotFoundError (missing_error) when there are none."""
        versions = self.repository.versions(self.name)
        if not versions:
            raise missing_error(self.repository.root, self.name)
        return versions

    def servable(self, pinned: int = 0, listed: tuple[int, ...] = ()) -> list[int]:
        """The published versions when there is something to serve (``pinned``: that version,
        unless 0; ``listed``: one of a specific version policy's versions, unless empty); else
        ModelNotFoundError with the one line that says what is missing and what is there. What
        ``mnist-serve`` checks before it listens."""
        try:
            versions = self.versions()
        except OSError as error:  # unreadable: permissions
            where = error.filename or self.repository.root
            raise RepositoryError(f"--model-repo {self.repository.root}: cannot list {where} "
                                  f"({error.strerror or error})") from None
        if pinned and pinned not in versions:
            raise ModelNotFoundError(
                f"--model-version {pinned}: model {self.name!r} has no version {pinned} in "
                f"{self.repository.root} (published: {_versions_text(versions)}); pin one of "
                "those, or 0 for the newest")
        if listed and versions and not set(listed).intersection(versions):
            raise ModelNotFoundError(
                f"version policy specific:{','.join(map(str, listed))}: model {self.name!r} has none "
                f"of these versions in {self.repository.root} (published: {_versions_text(versions)}); "
                "list published ones, or serve the newest (latest:N)")
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

    def load(self, version: int, rules: GateRules = GateRules(),
             baseline: Baseline | None = None) -> Gated:
        """The version, loaded and past the gate (``rules``; ``baseline``: the version now
        serving, for --max-regression); RepositoryError says why it is refused. The
        checks that need no model run first (metadata and its checksum, name and version, the
        check set, its checksum and its agreement with the metadata), so a refused version never
        costs a TensorFlow import where the LiteRT path serves. The metadata is read once, and
        each file is checked against it from the bytes that are then used (the check set, the
        flatbuffer, the Keras archive: see ``Metadata.read_file``)."""
        version_dir = self.repository.version_dir(self.name, version)
        # checked against metadata.json.sha256 if present; every other file against this
        metadata = Metadata.read(version_dir)
        spec = ModelSpec.from_metadata(metadata)
        if spec.name != self.name or spec.version != version:
            raise CorruptVersionError(
                f"{version_dir}: metadata says {spec.name!r} version {spec.version}"
            )
        if not metadata_checksummed(version_dir):
            logger.warning("%s has no %s (published before metadata was checksummed): its "
                           "metadata is served unverified", version_dir, METADATA_CHECKSUM_FILE)
        # read once and checked: the inference path's probe, the gate
        check_set = read_check_set(version_dir, metadata)
        if check_set is None:
            if not self.allow_missing_check_set:
                raise QualityGateError(
                    f"{version_dir / CHECK_SET_FILE} is missing, so the gate cannot check the "
                    "version's answers: publish the version with its check set, or start the server with "
                    "--allow-missing-check-set to serve it unchecked"
                )
            logger.warning("%s has no %s: serving it unchecked (--allow-missing-check-set)",
                           version_dir, CHECK_SET_FILE)
        recorded = metadata.check_set
        if check_set is not None and recorded is not None and recorded.count is not None \
                and recorded.count != check_set.labels.shape[0]:
            raise CorruptVersionError(
                f"{version_dir / CHECK_SET_FILE}: {check_set.labels.shape[0]} images, but "
                f"metadata.json records the check set's figures on {recorded.count}: the "
                "version's files do not belong together"
            )
        model = load_version(version_dir, inference=self.inference, check_set=check_set,
                             metadata=metadata)
        if model.spec != spec:
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: changed while loading")
        if check_set is None:
            return Gated(model, None)
        if recorded is None or recorded.accuracy is None:
            logger.warning("%s records no check-set accuracy (published before the trainer "
                           "recorded it): the gate cannot check that it reproduces", version_dir)
        accuracy = check_quality(model, check_set, version_dir / CHECK_SET_FILE, rules, recorded,
                                 baseline)
        logger.info("version %d passed the quality gate: check-set accuracy %.4f", version, accuracy)
        return Gated(model, accuracy)


class StaticSource:
    """One model from a loader function (tests, embedding): no versions to watch."""

    watchable = False

    def __init__(self, loader: Callable[[], Model]) -> None:
        self._loader = loader

    def versions(self) -> list[int]:
        return [0]  # the one model, whatever its version

    def __str__(self) -> str:
        return "a loader function"

    def load(self, version: int, rules: GateRules = GateRules(),
             baseline: Baseline | None = None) -> Gated:
        return Gated(self._loader(), None)  # nothing is gated

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
    timed_out: bool = False


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
        self._late: dict[str, tuple[object, asyncio.Future[object]]] = {}  # key: (tag, outcome)

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
        if late is not None and late[0] == tag:
            return late[1].result()  # type: ignore[return-value]
        attempt = self._running[key] = _Attempt(what, time.monotonic())
        outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

        def target() -> None:
            try:
                outcome.set_result(read())
            except BaseException as exc:  # handed to the awaiting task
                outcome.set_exception(exc)

        # Set on the loop when the thread returns (not at all once the loop is closed).
        returned = asyncio.wrap_future(outcome)
        returned.add_done_callback(partial(self._returned, key, attempt, tag))
        threading.Thread(target=target, name=f"repository {key}", daemon=True).start()
        done, _ = await asyncio.wait((returned,), timeout=self.timeout)  # cancelled: the thread goes on
        if not done:
            attempt.timed_out = True
            logger.error("repository read timed out: %s did not return within %gs (%.1fs); "
                         "skipped for now, retried once it returns", what, self.timeout,
                         time.monotonic() - attempt.started)
            if self._on_timeout is not None:
                self._on_timeout(key.split(" ", 1)[0])
            raise RepositoryTimeoutError(
                f"{what} did not return within the {self.timeout:g}s repository timeout "
                "(a hung read?); retried once it returns"
            )
        return returned.result()

    def _returned(self, key: str, attempt: _Attempt, tag: object, returned: asyncio.Future[T]) -> None:
        """A read's thread returned: its key may run again. One past its timeout is logged and,
        tagged, its outcome kept for the next run with the same tag (listings are read again)."""
        del self._running[key]
        error = returned.exception()  # retrieved, also where nobody awaits it any more
        if attempt.timed_out:
            if tag is not None:
                self._late[key] = (tag, returned)  # type: ignore[assignment]
            logger.warning("%s returned %.1fs after it started, past the %gs timeout (%s); "
                           "the next look %s",
                           attempt.what, time.monotonic() - attempt.started, self.timeout,
                           "failed" if error is not None else "succeeded",
                           "reads again" if tag is None else "takes this outcome")
