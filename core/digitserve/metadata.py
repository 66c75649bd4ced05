"""The schema of a published version's ``metadata.json``: typed, frozen, with a format version.

The trainer writes the document only through :meth:`Metadata.to_json`, and every reader parses it
only through :meth:`Metadata.from_json`, which raises one
:class:`~digitserve.errors.CorruptVersionError` naming the file and the field for a missing or
mistyped field. Sections a document may lack (documents written by older trainers, or by tests)
are ``None`` and are left out of :meth:`~Metadata.to_json`, which gives back the document it was
read from key for key, in the trainer's order; top-level keys this reader does not know are kept
in :attr:`Metadata.extra`. ``format`` 1 is what the trainer has written since the field was
introduced; a document without it is read as format 1, one with a newer format is refused.

The file itself is read and written here too: :func:`read_metadata` checks it against
``metadata.json.sha256``, :func:`write_metadata` stamps every other file's checksum into it (as
:func:`stamp_version` stamps the version) before writing it and then its own checksum,
:meth:`Metadata.read_file` reads a file the server uses once and checks those very bytes against
it (what is hashed is what is used: no window between the check and the use), and
:meth:`Metadata.verify_files` / :func:`verify_files` check files on disk against it. Every format-1
document the trainer ever wrote records ``files``: the SHA-256 of every file of its version, the
check set included. No other module indexes the document by its keys
(``tests/test_architecture.py`` checks).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from digitserve.errors import CorruptVersionError

METADATA_FILE = "metadata.json"
METADATA_CHECKSUM_FILE = "metadata.json.sha256"  # `sha256sum -c` format; written last

FORMAT_VERSION = 1
"""The format the trainer writes; readers accept it and every older one."""

T = TypeVar("T")
Scalar = str | int | float | bool | None


class _Fields:
    """Typed reads of one JSON object, each failure one error naming the file and the field."""

    def __init__(self, doc: Any, path: str | Path, prefix: str = "") -> None:
        self.path, self.prefix = path, prefix
        if not isinstance(doc, Mapping):
            self.fail("", "expected a JSON object", doc)
        self.doc: Mapping[str, Any] = doc

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, expected: str, value: Any) -> Any:
        name = self.name(key) if key else self.prefix.rstrip(".")
        where = f"field '{name}'" if name else "the document"
        raise CorruptVersionError(f"{self.path}: {where}: {expected}, got {_shown(value)}")

    def get(self, key: str, check: Callable[[Any], T | None], expected: str,
            *, required: bool = False) -> T | None:
        if key not in self.doc:
            if required:
                raise CorruptVersionError(f"{self.path}: field '{self.name(key)}': missing")
            return None
        value = check(self.doc[key])
        if value is None:
            self.fail(key, expected, self.doc[key])
        return value

    def req(self, key: str, check: Callable[[Any], T | None], expected: str) -> T:
        value = self.get(key, check, expected, required=True)
        assert value is not None
        return value

    def nullable_float(self, key: str) -> float | None:
        """A number or null, the key required (the trainer writes null for a figure it lacks)."""
        if key not in self.doc:
            raise CorruptVersionError(f"{self.path}: field '{self.name(key)}': missing")
        if self.doc[key] is None:
            return None
        return self.req(key, _number, "expected a number")

    def section(self, key: str) -> _Fields | None:
        if key not in self.doc:
            return None
        return _Fields(self.doc[key], self.path, f"{self.name(key)}.")


def _shown(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    n = _int(value)
    return n if n is not None and n >= 0 else None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _list_of(item: Callable[[Any], T | None]) -> Callable[[Any], tuple[T, ...] | None]:
    def check(value: Any) -> tuple[T, ...] | None:
        if not isinstance(value, list):
            return None
        items = [item(v) for v in value]
        return None if any(v is None for v in items) else tuple(v for v in items if v is not None)
    return check


def _positive(value: Any) -> int | None:
    n = _int(value)
    return n if n is not None and n > 0 else None


def _object_of(item: Callable[[Any], T | None]) -> Callable[[Any], dict[str, T] | None]:
    def check(value: Any) -> dict[str, T] | None:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return None
        items = {k: item(v) for k, v in value.items()}
        return None if any(v is None for v in items.values()) \
            else {k: v for k, v in items.items() if v is not None}
    return check


def _scalar(value: Any) -> Scalar | _Missing:
    return value if value is None or isinstance(value, str | int | float | bool) else _MISSING


class _Missing:
    pass


_MISSING = _Missing()


def _scalars(value: Any) -> dict[str, Scalar] | None:
    """A JSON object of scalars (null included)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        return None
    if any(isinstance(_scalar(v), _Missing) for v in value.values()):
        return None
    return dict(value)


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Sets ``key`` unless ``value`` is None (an absent optional field)."""
    if value is not None:
        out[key] = value


@dataclass(frozen=True)
class InputSpec:
    """``input``: what ``predict`` takes: images of ``shape``, flattened to ``size`` values,
    pixels multiplied by ``scale``."""

    shape: tuple[int, ...]
    size: int
    scale: float
    dtype: str | None = None

    @classmethod
    def from_json(cls, f: _Fields) -> InputSpec:
        shape = f.req("shape", _list_of(_positive), "expected a list of positive integers")
        size = f.req("size", _positive, "expected a positive integer")
        if math.prod(shape) != size:
            f.fail("size", f"expected {math.prod(shape)}, the product of input.shape", size)
        return cls(shape=shape, size=size,
                   scale=f.req("scale", _number, "expected a number"),
                   dtype=f.get("dtype", _str, "expected a string"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "size": self.size, "scale": self.scale}
        _put(out, "dtype", self.dtype)
        return out


@dataclass(frozen=True)
class DataInfo:
    """``data``: where the training data came from and how much of it there was."""

    dir: str | None = None
    files: dict[str, dict[str, Scalar]] | None = None
    train_size: int | None = None
    test_size: int | None = None
    holdout_size: int | None = None

    @classmethod
    def from_json(cls, f: _Fields) -> DataInfo:
        return cls(
            dir=f.get("dir", _str, "expected a string"),
            files=f.get("files", _object_of(_scalars), "expected an object of objects"),
            train_size=f.get("train_size", _count, "expected a count"),
            test_size=f.get("test_size", _count, "expected a count"),
            holdout_size=f.get("holdout_size", _count, "expected a count"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "dir", self.dir)
        _put(out, "files", None if self.files is None else {k: dict(v) for k, v in self.files.items()})
        _put(out, "train_size", self.train_size)
        _put(out, "test_size", self.test_size)
        _put(out, "holdout_size", self.holdout_size)
        return out


@dataclass(frozen=True)
class Inference:
    """``inference``: the path the trainer's reloaded model chose and the figures it chose it on;
    ``litert_file`` and ``tolerance`` when it published a LiteRT flatbuffer a server without
    TensorFlow may serve."""

    path: str
    probe_images: int
    litert_max_diff: float | None
    tensorflow_batch1_max_diff: float
    litert_file: str | None = None
    tolerance: float | None = None

    @classmethod
    def from_json(cls, f: _Fields) -> Inference:
        return cls(
            path=f.req("path", _str, "expected a string"),
            probe_images=f.req("probe_images", _count, "expected a count"),
            litert_max_diff=f.nullable_float("litert_max_diff"),
            tensorflow_batch1_max_diff=f.req("tensorflow_batch1_max_diff", _number,
                                             "expected a number"),
            litert_file=f.get("litert_file", _str, "expected a string"),
            tolerance=f.get("tolerance", _number, "expected a number"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path, "probe_images": self.probe_images,
            "litert_max_diff": self.litert_max_diff,
            "tensorflow_batch1_max_diff": self.tensorflow_batch1_max_diff,
        }
        _put(out, "litert_file", self.litert_file)
        _put(out, "tolerance", self.tolerance)
        return out


@dataclass(frozen=True)
class ClassFigures:
    """One entry of ``metrics.per_class``."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int

    @classmethod
    def from_json(cls, value: Any, path: str | Path, prefix: str) -> ClassFigures:
        f = _Fields(value, path, prefix)
        return cls(label=f.req("label", _str, "expected a string"),
                   precision=f.req("precision", _number, "expected a number"),
                   recall=f.req("recall", _number, "expected a number"),
                   f1=f.req("f1", _number, "expected a number"),
                   support=f.req("support", _count, "expected a count"))

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "support": self.support}


@dataclass(frozen=True)
class Baseline:
    """``metrics.baseline``: the classical model the network is compared with."""

    name: str
    accuracy: float
    n_estimators: int | None = None
    seconds: float | None = None

    @classmethod
    def from_json(cls, f: _Fields) -> Baseline:
        return cls(name=f.req("name", _str, "expected a string"),
                   n_estimators=f.get("n_estimators", _count, "expected a count"),
                   accuracy=f.req("accuracy", _number, "expected a number"),
                   seconds=f.get("seconds", _number, "expected a number"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        _put(out, "n_estimators", self.n_estimators)
        out["accuracy"] = self.accuracy
        _put(out, "seconds", self.seconds)
        return out


@dataclass(frozen=True)
class Metrics:
    """``metrics``: the reloaded model's figures on the test images (and the hold-out part)."""

    test_accuracy: float | None = None
    test_loss: float | None = None
    confusion_matrix: tuple[tuple[int, ...], ...] | None = None
    per_class: tuple[ClassFigures, ...] | None = None
    holdout_accuracy: float | None = None
    holdout_loss: float | None = None
    baseline: Baseline | None = None

    @classmethod
    def from_json(cls, f: _Fields) -> Metrics:
        per_class = f.get("per_class", lambda v: v if isinstance(v, list) else None, "expected a list")
        baseline = f.section("baseline")
        return cls(
            test_accuracy=f.get("test_accuracy", _number, "expected a number"),
            test_loss=f.get("test_loss", _number, "expected a number"),
            confusion_matrix=f.get("confusion_matrix", _list_of(_list_of(_count)),
                                   "expected a list of lists of counts"),
            per_class=None if per_class is None else tuple(
                ClassFigures.from_json(v, f.path, f"{f.name('per_class')}[{i}].")
                for i, v in enumerate(per_class)
            ),
            holdout_accuracy=f.get("holdout_accuracy", _number, "expected a number"),
            holdout_loss=f.get("holdout_loss", _number, "expected a number"),
            baseline=None if baseline is None else Baseline.from_json(baseline),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "test_accuracy", self.test_accuracy)
        _put(out, "test_loss", self.test_loss)
        _put(out, "confusion_matrix", None if self.confusion_matrix is None
             else [list(row) for row in self.confusion_matrix])
        _put(out, "per_class", None if self.per_class is None
             else [c.to_json() for c in self.per_class])
        _put(out, "holdout_accuracy", self.holdout_accuracy)
        _put(out, "holdout_loss", self.holdout_loss)
        _put(out, "baseline", None if self.baseline is None else self.baseline.to_json())
        return out


@dataclass(frozen=True)
class CheckSetInfo:
    """``check_set``: the file of images the server's gate checks a version on, and the figures
    the trainer computed on them."""

    file: str | None = None
    count: int | None = None
    accuracy: float | None = None
    mean_cross_entropy: float | None = None

    @classmethod
    def from_json(cls, f: _Fields) -> CheckSetInfo:
        return cls(file=f.get("file", _str, "expected a string"),
                   count=f.get("count", _count, "expected a count"),
                   accuracy=f.get("accuracy", _number, "expected a number"),
                   mean_cross_entropy=f.get("mean_cross_entropy", _number, "expected a number"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "file", self.file)
        _put(out, "count", self.count)
        _put(out, "accuracy", self.accuracy)
        _put(out, "mean_cross_entropy", self.mean_cross_entropy)
        return out


@dataclass(frozen=True)
class FileEntry:
    """One entry of ``files``: a published file's SHA-256 (hex) and size."""

    sha256: str
    bytes: int | None = None

    @classmethod
    def from_json(cls, value: Any, path: str | Path, prefix: str) -> FileEntry:
        f = _Fields(value, path, prefix)
        return cls(sha256=f.req("sha256", _str, "expected a hex SHA-256"),
                   bytes=f.get("bytes", _count, "expected a count"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256}
        _put(out, "bytes", self.bytes)
        return out


_KNOWN = ("format", "name", "version", "preset", "hyperparameters", "seed", "input", "labels",
          "data", "versions", "created_at", "inference", "metrics", "check_set", "history",
          "train_seconds", "report", "files")


@dataclass(frozen=True)
class Metadata:
    """A version's ``metadata.json``. ``name`` and ``version`` are required; a served version
    needs ``input`` and ``labels`` too (:meth:`served_io`)."""

    name: str
    version: int
    format: int | None = None
    preset: str | None = None
    hyperparameters: dict[str, Scalar] | None = None
    seed: int | None = None
    input: InputSpec | None = None
    labels: tuple[str, ...] | None = None
    data: DataInfo | None = None
    versions: dict[str, str] | None = None
    """The library versions the trainer ran with (``python``, ``tensorflow``, ``keras``, ...)."""
    created_at: str | None = None
    inference: Inference | None = None
    metrics: Metrics | None = None
    check_set: CheckSetInfo | None = None
    history: dict[str, tuple[float, ...]] | None = None
    train_seconds: float | None = None
    report: tuple[str, ...] | None = None
    """The report's files, relative to the version directory."""
    files: dict[str, FileEntry] | None = None
    """Every published file's checksum (the repository writes them when it publishes)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys this reader does not know, kept as they were."""
    source: str = field(default=METADATA_FILE, compare=False)
    """Where the document was read from, for errors found later (:meth:`served_io`)."""

    @classmethod
    def from_json(cls, doc: Any, path: str | Path = METADATA_FILE) -> Metadata:
        """The document ``doc`` (parsed JSON) read from ``path``; CorruptVersionError names the
        file and the first missing or mistyped field."""
        f = _Fields(doc, path)
        fmt = f.get("format", _positive, "expected a positive integer")
        if fmt is not None and fmt > FORMAT_VERSION:
            f.fail("format", f"expected a format this reader knows (at most {FORMAT_VERSION}); "
                             "upgrade digitserve to read it", fmt)
        sections = {key: f.section(key) for key in ("input", "data", "inference", "metrics",
                                                    "check_set")}
        files = f.get("files", lambda v: v if isinstance(v, Mapping) else None, "expected an object")
        return cls(
            format=fmt,
            name=f.req("name", _str, "expected a string"),
            version=f.req("version", _int, "expected an integer"),
            preset=f.get("preset", _str, "expected a string"),
            hyperparameters=f.get("hyperparameters", _scalars, "expected an object of scalars"),
            seed=f.get("seed", _int, "expected an integer"),
            input=None if (s := sections["input"]) is None else InputSpec.from_json(s),
            labels=f.get("labels", _list_of(_str), "expected a list of strings"),
            data=None if (s := sections["data"]) is None else DataInfo.from_json(s),
            versions=f.get("versions", _object_of(_str), "expected an object of strings"),
            created_at=f.get("created_at", _str, "expected a string"),
            inference=None if (s := sections["inference"]) is None else Inference.from_json(s),
            metrics=None if (s := sections["metrics"]) is None else Metrics.from_json(s),
            check_set=None if (s := sections["check_set"]) is None else CheckSetInfo.from_json(s),
            history=f.get("history", _object_of(_list_of(_number)),
                          "expected an object of lists of numbers"),
            train_seconds=f.get("train_seconds", _number, "expected a number"),
            report=f.get("report", _list_of(_str), "expected a list of strings"),
            files=None if files is None else {
                str(k): FileEntry.from_json(v, path, f"files.{k}.") for k, v in files.items()
            },
            extra={k: v for k, v in f.doc.items() if k not in _KNOWN},
            source=str(path),
        )

    @classmethod
    def read(cls, version_dir: Path) -> Metadata:
        """A version directory's metadata, checked against ``metadata.json.sha256`` (see
        :func:`read_metadata`) and parsed."""
        return cls.from_json(read_metadata(version_dir), version_dir / METADATA_FILE)

    def to_json(self) -> dict[str, Any]:
        """The document, keys in the trainer's order, absent sections left out."""
        out: dict[str, Any] = {}
        _put(out, "format", self.format)
        out["name"] = self.name
        out["version"] = self.version
        _put(out, "preset", self.preset)
        _put(out, "hyperparameters", None if self.hyperparameters is None
             else dict(self.hyperparameters))
        _put(out, "seed", self.seed)
        _put(out, "input", None if self.input is None else self.input.to_json())
        _put(out, "labels", None if self.labels is None else list(self.labels))
        _put(out, "data", None if self.data is None else self.data.to_json())
        _put(out, "versions", None if self.versions is None else dict(self.versions))
        _put(out, "created_at", self.created_at)
        _put(out, "inference", None if self.inference is None else self.inference.to_json())
        _put(out, "metrics", None if self.metrics is None else self.metrics.to_json())
        _put(out, "check_set", None if self.check_set is None else self.check_set.to_json())
        _put(out, "history", None if self.history is None
             else {k: list(v) for k, v in self.history.items()})
        _put(out, "train_seconds", self.train_seconds)
        _put(out, "report", None if self.report is None else list(self.report))
        _put(out, "files", None if self.files is None
             else {k: v.to_json() for k, v in self.files.items()})
        out.update(self.extra)
        return out

    def digest(self, rel: str) -> str | None:
        """The SHA-256 ``files`` records for the file ``rel`` of the version (None: not recorded)."""
        entry = None if self.files is None else self.files.get(rel)
        return None if entry is None else entry.sha256

    def read_file(self, version_dir: Path, rel: str, *, required: bool = True) -> bytes:
        """The bytes of the version's file ``rel``, read once and checked against the SHA-256
        ``files`` records for it: the caller uses these bytes, never the file again, so what was
        checked is what is used. CorruptVersionError when the file is missing or unreadable, when
        its digest differs (the one line of :func:`changed_error`), or, ``required``, when
        ``files`` records none for it; not ``required``, such a file is returned unchecked (the
        caller says so)."""
        path = version_dir / rel
        expected = self.digest(rel)
        if expected is None and required:
            missing = "no 'files' checksums" if self.files is None else f"no checksum for {rel}"
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: {missing}")
        data = _read_bytes(path)
        if expected is not None:
            actual = sha256_bytes(data)
            if actual != expected:
                raise changed_error(path, actual, expected, METADATA_FILE)
        return data

    def verify_files(self, version_dir: Path, only: list[str] | None = None) -> None:
        """Checks the version's files against ``files`` (all of them, or those in ``only``);
        CorruptVersionError names the first file that is missing or differs."""
        verify_checksums(version_dir, None if self.files is None
                         else {rel: entry.sha256 for rel, entry in self.files.items()}, only)

    def served_io(self) -> tuple[InputSpec, tuple[str, ...]]:
        """``input`` and ``labels``, which a served version must have."""
        for key in ("input", "labels"):
            if getattr(self, key) is None:
                raise CorruptVersionError(f"{self.source}: field '{key}': missing")
        assert self.input is not None and self.labels is not None
        return self.input, self.labels


# metadata.json as a file: read with its checksum checked, written with every file's.


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def changed_error(path: Path, actual: str, expected: str, recorded_in: str) -> CorruptVersionError:
    """The one line refusing a version whose file ``path`` has the SHA-256 ``actual`` where
    ``recorded_in`` (metadata.json, or metadata.json.sha256 for metadata.json itself) records
    ``expected``."""
    return CorruptVersionError(f"{path}: sha256 is {actual}, {recorded_in} says {expected}; the "
                               "file changed after publishing: republish the version")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_METADATA_NAMES = {METADATA_FILE, METADATA_CHECKSUM_FILE}


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def stamp_version(document: dict[str, Any], version: int) -> None:
    """Sets the ``version`` of a metadata document (the publisher's number for it; the client's
    copy of the served metadata gets the version the server answered for)."""
    document["version"] = version


def write_metadata(directory: Path, document: dict[str, Any]) -> None:
    """Stamps ``files`` of ``document`` with the SHA-256 and size of every other file under
    ``directory``, then writes it as ``metadata.json`` and, last, ``metadata.json.sha256``
    (each atomically). The repository's publisher calls it on a staged version."""
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in _METADATA_NAMES:
            files[rel] = FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size).to_json()
    document["files"] = files
    data = (json.dumps(document, indent=2, sort_keys=False) + "\n").encode("utf-8")
    _write_atomically(directory / METADATA_FILE, data)
    write_metadata_checksum(directory)


def write_metadata_checksum(directory: Path) -> None:
    """Writes ``metadata.json.sha256`` for the directory's ``metadata.json`` (the publisher does,
    last; ``sha256sum -c metadata.json.sha256`` checks it)."""
    digest = sha256_file(directory / METADATA_FILE)
    _write_atomically(directory / METADATA_CHECKSUM_FILE,
                      f"{digest}  {METADATA_FILE}\n".encode("ascii"))


def _read_bytes(path: Path) -> bytes:
    """A version file's bytes; CorruptVersionError naming it when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise CorruptVersionError(f"{path}: missing") from exc
    except OSError as exc:
        raise CorruptVersionError(f"{path}: unreadable ({exc})") from exc


def read_metadata(version_dir: Path) -> dict[str, Any]:
    """The parsed metadata.json of a version directory, checked against ``metadata.json.sha256``
    when the version has one (versions published before it have none: see
    :func:`metadata_checksummed`); CorruptVersionError if unreadable or if it differs."""
    path = version_dir / METADATA_FILE
    data = _read_bytes(path)
    expected = _recorded_metadata_checksum(version_dir)
    if expected is not None:
        actual = sha256_bytes(data)  # the bytes parsed below: what is checked is what is used
        if actual != expected:
            raise changed_error(path, actual, expected, METADATA_CHECKSUM_FILE)
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
            raise changed_error(path, actual, expected, METADATA_FILE)
