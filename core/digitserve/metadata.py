"""The schema of a published version's ``metadata.json`` (frozen pydantic models, format 1), and
the file itself with its checksums.

:meth:`Metadata.from_json` is the one reader: a missing or mistyped field is one
:class:`~digitserve.errors.CorruptVersionError` naming the file and the field. A section a document
lacks is None; a field that may be left out may not be null. :meth:`~Metadata.to_json` gives the
document back key for key in the trainer's order, absent sections left out and unknown top-level
keys (:attr:`Metadata.extra`) kept. A document without ``format`` is format 1; a newer one is
refused. :func:`read_metadata` checks the file against ``metadata.json.sha256``;
:func:`write_metadata` stamps every other file's SHA-256 into ``files`` and writes both;
:meth:`Metadata.read_file` checks the very bytes its caller then uses (no window between the
check and the use). No other module indexes the document by its keys
(``tests/test_architecture.py`` checks).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from digitserve.errors import CorruptVersionError

METADATA_FILE = "metadata.json"
METADATA_CHECKSUM_FILE = "metadata.json.sha256"  # `sha256sum -c` format; written last

FORMAT_VERSION = 1
"""The format the trainer writes; readers accept it and every older one."""


@dataclass(frozen=True)
class Expect:
    """What a field holds, as its error says: ``expected <text>, got <value>``."""

    text: str


Text = Annotated[str, Strict(), Expect("a string")]
Integer = Annotated[int, Strict(), Expect("an integer")]
Count = Annotated[int, Strict(), Field(ge=0), Expect("a count")]
Positive = Annotated[int, Strict(), Field(gt=0), Expect("a positive integer")]
Number = Annotated[float, Strict(), Expect("a number")]  # finite (allow_inf_nan below); int too
Scalar = StrictBool | StrictStr | StrictInt | Annotated[float, Strict(), AllowInfNan()] | None
Scalars = Annotated[dict[str, Scalar], Expect("an object of scalars")]
Strings = Annotated[tuple[StrictStr, ...], Expect("a list of strings")]


class Section(BaseModel):
    """An object of the document: typed, frozen; :meth:`to_json` leaves out the fields that may
    be absent and are (None)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, ser_json_inf_nan="constants")

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any, info: ValidationInfo) -> Any:
        """In a document, a field that may be left out is left out, not null (it fails its type)."""
        if value is None and info.context and not cls.model_fields[str(info.field_name)].is_required():
            raise PydanticCustomError("null", "null")
        return value

    @model_serializer(mode="wrap")
    def _absent_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        fields = type(self).model_fields
        out: dict[str, Any] = handler(self)
        return {k: v for k, v in out.items() if v is not None or k not in fields or fields[k].is_required()}

    def to_json(self) -> dict[str, Any]:
        """The object as JSON data, keys in the trainer's order, absent fields left out."""
        return self.model_dump(mode="json")


class InputSpec(Section):
    """``input``: what ``predict`` takes: images of ``shape``, flattened to ``size`` values,
    pixels multiplied by ``scale``."""

    shape: Annotated[tuple[Positive, ...], Expect("a list of positive integers")]
    size: Positive
    scale: Number
    dtype: Text | None = None

    @field_validator("size")
    @classmethod
    def _product(cls, size: int, info: ValidationInfo) -> int:
        shape = info.data.get("shape")
        if shape is not None and math.prod(shape) != size:
            raise PydanticCustomError("expected", f"{math.prod(shape)}, the product of input.shape")
        return size


class DataInfo(Section):
    """``data``: where the training data came from and how much of it there was."""

    dir: Text | None = None
    files: Annotated[dict[str, dict[str, Scalar]], Expect("an object of objects")] | None = None
    train_size: Count | None = None
    test_size: Count | None = None
    holdout_size: Count | None = None


class Inference(Section):
    """``inference``: the path the trainer's reloaded model chose and the figures it chose it on;
    ``litert_file`` and ``tolerance`` when it published a LiteRT flatbuffer a server without
    TensorFlow may serve."""

    path: Text
    probe_images: Count
    litert_max_diff: Number | None  # required; null when there was no flatbuffer to compare
    tensorflow_batch1_max_diff: Number
    litert_file: Text | None = None
    tolerance: Number | None = None


class ClassFigures(Section):
    """One entry of ``metrics.per_class``."""

    label: Text
    precision: Number
    recall: Number
    f1: Number
    support: Count


class Baseline(Section):
    """``metrics.baseline``: the classical model the network is compared with."""

    name: Text
    n_estimators: Count | None = None
    accuracy: Number
    seconds: Number | None = None


class Metrics(Section):
    """``metrics``: the reloaded model's figures on the test images (and the hold-out part)."""

    test_accuracy: Number | None = None
    test_loss: Number | None = None
    confusion_matrix: Annotated[tuple[tuple[Count, ...], ...],
                                Expect("a list of lists of counts")] | None = None
    per_class: Annotated[tuple[ClassFigures, ...], Expect("a list")] | None = None
    holdout_accuracy: Number | None = None
    holdout_loss: Number | None = None
    baseline: Baseline | None = None


class CheckSetInfo(Section):
    """``check_set``: the file of images the server's gate checks a version on, and the figures
    the trainer computed on them."""

    file: Text | None = None
    count: Count | None = None
    accuracy: Number | None = None
    mean_cross_entropy: Number | None = None


class FileEntry(Section):
    """One entry of ``files``: a published file's SHA-256 (hex) and size."""

    sha256: Annotated[str, Strict(), Expect("a hex SHA-256")]
    bytes: Count | None = None


class Metadata(Section):
    """A version's ``metadata.json``. ``name`` and ``version`` are required; a served version
    needs ``input`` and ``labels`` too (:meth:`served_io`)."""

    model_config = ConfigDict(extra="allow")

    format: Positive | None = None
    name: Text
    version: Integer
    preset: Text | None = None
    hyperparameters: Scalars | None = None
    seed: Integer | None = None
    input: InputSpec | None = None
    labels: Strings | None = None
    data: DataInfo | None = None
    versions: Annotated[dict[str, StrictStr], Expect("an object of strings")] | None = None
    """The library versions the trainer ran with (``python``, ``tensorflow``, ``keras``, ...)."""
    created_at: Text | None = None
    inference: Inference | None = None
    metrics: Metrics | None = None
    check_set: CheckSetInfo | None = None
    history: Annotated[dict[str, tuple[Number, ...]],
                       Expect("an object of lists of numbers")] | None = None
    train_seconds: Number | None = None
    report: Strings | None = None
    """The report's files, relative to the version directory."""
    files: Annotated[dict[str, FileEntry], Expect("an object")] | None = None
    """Every published file's checksum (the repository writes them when it publishes)."""
    _source: str = PrivateAttr(default=METADATA_FILE)

    @field_validator("format")
    @classmethod
    def _known(cls, fmt: int | None) -> int | None:
        if fmt is not None and fmt > FORMAT_VERSION:
            raise PydanticCustomError("expected", f"a format this reader knows (at most {FORMAT_VERSION}); "
                                                  "upgrade digitserve to read it")
        return fmt

    @property
    def extra(self) -> dict[str, Any]:
        """Top-level keys this reader does not know, kept as they were."""
        return dict(self.model_extra or {})

    @property
    def source(self) -> str:
        """Where the document was read from, for errors found later (:meth:`served_io`)."""
        return self._source

    def __eq__(self, other: object) -> bool:  # where it was read from is not compared
        return isinstance(other, Metadata) and self.to_json() == other.to_json()

    @classmethod
    def from_json(cls, doc: Any, path: str | Path = METADATA_FILE) -> Metadata:
        """The document ``doc`` (parsed JSON) read from ``path``; CorruptVersionError names the
        file and the first missing or mistyped field."""
        try:
            return cls.model_validate(doc, context={"source": str(path)})
        except ValidationError as exc:
            raise CorruptVersionError(f"{path}: {_first_error(exc.errors()[0], doc)}") from None

    def model_post_init(self, context: Any, /) -> None:
        if isinstance(context, dict) and "source" in context:
            self._source = context["source"]

    @classmethod
    def read(cls, version_dir: Path) -> Metadata:
        """A version directory's metadata, checked against ``metadata.json.sha256`` (see
        :func:`read_metadata`) and parsed."""
        return cls.from_json(read_metadata(version_dir), version_dir / METADATA_FILE)

    def digest(self, rel: str) -> str | None:
        """The SHA-256 ``files`` records for the file ``rel`` of the version (None: not recorded)."""
        entry = None if self.files is None else self.files.get(rel)
        return None if entry is None else entry.sha256

    def _recorded(self, version_dir: Path, rel: str) -> str:
        if (expected := self.digest(rel)) is None:
            missing = "no 'files' checksums" if self.files is None else f"no checksum for {rel}"
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: {missing}")
        return expected

    def read_file(self, version_dir: Path, rel: str, *, required: bool = True) -> bytes:
        """The bytes of the version's file ``rel``, read once and checked against the SHA-256
        ``files`` records for it: the caller uses these bytes, never the file again.
        CorruptVersionError when the file is missing or unreadable, when its digest differs (the
        line of :func:`changed_error`), or, ``required``, when ``files`` records none for it; not
        ``required``, such a file is returned unchecked (the caller says so)."""
        expected = self._recorded(version_dir, rel) if required else self.digest(rel)
        data = _read_bytes(version_dir / rel)
        if expected is not None and (actual := sha256_bytes(data)) != expected:
            raise changed_error(version_dir / rel, actual, expected, METADATA_FILE)
        return data

    def verify_files(self, version_dir: Path, only: list[str] | None = None) -> None:
        """Checks the version's files against ``files`` (all of them, or those in ``only``);
        CorruptVersionError names the first file that is missing or differs."""
        if self.files is None:
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: no 'files' checksums")
        for rel in sorted(self.files) if only is None else only:
            expected, path = self._recorded(version_dir, rel), version_dir / rel
            if not path.is_file():
                raise CorruptVersionError(f"{path}: missing")
            if (actual := sha256_file(path)) != expected:
                raise changed_error(path, actual, expected, METADATA_FILE)

    def served_io(self) -> tuple[InputSpec, tuple[str, ...]]:
        """``input`` and ``labels``, which a served version must have."""
        for key in ("input", "labels"):
            if getattr(self, key) is None:
                raise CorruptVersionError(f"{self.source}: field '{key}': missing")
        assert self.input is not None and self.labels is not None
        return self.input, self.labels


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """``tp`` without Annotated and ``| None``, and the Annotated metadata on the way."""
    found: list[Any] = []
    while get_origin(tp) in (Annotated, Union, types.UnionType):
        found += getattr(tp, "__metadata__", ())
        tp = get_args(tp)[0]
    return tp, found


def _first_error(error: ErrorDetails, doc: Any) -> str:
    """Pydantic's ``error`` as one line naming the field as the document writes it: the innermost
    field of a model on its path (``metrics.per_class[3].f1``; ``input.shape`` for an item of
    it), what it holds (its :class:`Expect`), and what the document has there."""
    tp: Any = Metadata
    name, trail, used, expected = "", "", 0, "a JSON object"
    for i, part in enumerate(error["loc"]):
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            field = tp.model_fields[str(part)]
            tp, found = _unwrap(field.annotation)
            name = trail = f"{trail}.{part}".lstrip(".")
            used = i + 1
            expected = next((m.text for m in [*field.metadata, *found] if isinstance(m, Expect)), "")
        elif get_origin(tp) in (tuple, dict):
            trail += f"[{part}]" if isinstance(part, int) else f".{part}"
            tp = _unwrap(get_args(tp)[-1 if get_origin(tp) is dict else 0])[0]
        else:
            break
    if isinstance(tp, type) and issubclass(tp, BaseModel):  # not an object
        name, used, expected = trail, len(error["loc"]), "a JSON object"
    where = f"field '{name}'" if name else "the document"
    if error["type"] == "missing":
        return f"{where}: missing"
    value = doc
    for part in error["loc"][:used]:
        value = value[part]
    text = error["msg"] if error["type"] == "expected" else expected
    return f"{where}: expected {text}, got {_shown(value)}"


def _shown(value: Any) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


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


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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
    document["files"] = {
        rel: FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size).to_json()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and (rel := path.relative_to(directory).as_posix())
        not in (METADATA_FILE, METADATA_CHECKSUM_FILE)
    }
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
    # The bytes parsed below: what is checked is what is used.
    if expected is not None and (actual := sha256_bytes(data)) != expected:
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
    """Checks files against the checksums of the metadata document (:meth:`Metadata.verify_files`)."""
    Metadata.from_json(metadata, version_dir / METADATA_FILE).verify_files(version_dir, only)
