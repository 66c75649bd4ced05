"""The metadata.json schema (digitserve.metadata): format 1 as main's trainer published it loads
and writes back byte for byte, today's trainer writes the same keys, and a missing or mistyped
field is one error naming the file and the field."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from digitserve.metadata import FORMAT_VERSION, METADATA_FILE, DataInfo, Metadata
from digitserve.repository import CorruptVersionError, ModelRepository

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "format1" / "mnist" / "1"
"""metadata.json (and its checksum) of a version published by main's trainer (bc5cc53):
``mnist-train train --preset seed --epochs 1`` on the real MNIST files."""


def _fixture() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURE / METADATA_FILE).read_text())
    return doc


def test_a_format_1_version_published_by_main_reads_and_writes_back_byte_for_byte() -> None:
    metadata = Metadata.read(FIXTURE)  # checked against metadata.json.sha256 as the server does
    assert metadata.format == FORMAT_VERSION == 1
    assert (metadata.name, metadata.version, metadata.preset) == ("mnist", 1, "seed")
    assert metadata.input is not None and metadata.input.shape == (28, 28)
    assert metadata.input.size == 784 and metadata.input.scale == 1 / 255
    assert metadata.labels == tuple("0123456789")
    assert metadata.inference is not None and metadata.inference.litert_file == "model.tflite"
    assert metadata.metrics is not None and metadata.metrics.per_class is not None
    assert [c.label for c in metadata.metrics.per_class] == list("0123456789")
    assert metadata.files is not None and sorted(metadata.files) == \
        sorted(["check_set.npz", "model.keras", "model.tflite", *(metadata.report or ())])
    assert metadata.extra == {}
    # The document written back is the one read, key for key in the same order, and its bytes
    # are the publisher's (json.dumps(indent=2) and a newline, as the repository writes it).
    assert metadata.to_json() == _fixture()
    assert list(metadata.to_json()) == list(_fixture())
    assert json.dumps(metadata.to_json(), indent=2) + "\n" == (FIXTURE / METADATA_FILE).read_text()
    assert Metadata.from_json(metadata.to_json(), "again") == metadata


def _shape(value: Any, names: bool = False) -> Any:
    """The document's structure: keys in order and the JSON types of the values (the keys of the
    objects keyed by file name are left out, since the data files' names differ)."""
    if isinstance(value, dict):
        if names:
            return sorted({json.dumps(_shape(v)) for v in value.values()})
        return [(k, _shape(v, names=k == "files")) for k, v in value.items()]
    if isinstance(value, list):
        return ["list", sorted({json.dumps(_shape(v)) for v in value})]
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) \
        else type(value).__name__


def test_todays_trainer_writes_the_keys_main_wrote_and_reads_back_its_own_file(tiny_repo: Path) -> None:
    version_dir = tiny_repo / "tiny" / "1"
    published = json.loads((version_dir / METADATA_FILE).read_text())
    expected = _fixture()
    # tiny_repo is trained without its report: the list of the report's files is empty.
    assert published["report"] == [] and expected["report"]
    published["report"] = expected["report"]
    # Hyper-parameters are the preset's fields, free-form: today's trainer writes every one main
    # wrote, and the fields presets gained since (issue 25: hidden_layers, the small CNN's) besides.
    hyperparameters = published["hyperparameters"]
    assert set(expected["hyperparameters"]) <= set(hyperparameters)
    published["hyperparameters"] = {k: v for k, v in hyperparameters.items()
                                    if k in expected["hyperparameters"]}
    assert _shape(published) == _shape(expected)
    metadata = Metadata.read(version_dir)
    assert json.dumps(metadata.to_json(), indent=2) + "\n" == (version_dir / METADATA_FILE).read_text()
    metadata.verify_files(version_dir)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split("/")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    at = int(last) if isinstance(doc, list) else last
    if value is _DELETE:
        del doc[at]
    else:
        doc[at] = value


_DELETE = object()


@pytest.mark.parametrize(("field", "value", "error"), [
    ("input/shape", "28x28",
     "field 'input.shape': expected a list of positive integers, got \"28x28\""),
    ("input/shape", [28, 0], "field 'input.shape': expected a list of positive integers, got [28, 0]"),
    ("input/size", 100, "field 'input.size': expected 784, the product of input.shape, got 100"),
    ("input/scale", _DELETE, "field 'input.scale': missing"),
    ("name", _DELETE, "field 'name': missing"),
    ("version", "1", "field 'version': expected an integer, got \"1\""),
    ("version", True, "field 'version': expected an integer, got true"),
    ("format", 2, "field 'format': expected a format this reader knows (at most 1); upgrade "
                  "digitserve to read it, got 2"),
    ("labels", ["0", 1], "field 'labels': expected a list of strings, got [\"0\", 1]"),
    ("metrics/per_class/3/f1", None, "field 'metrics.per_class[3].f1': expected a number, got null"),
    ("metrics/test_accuracy", "0.93", "field 'metrics.test_accuracy': expected a number, got \"0.93\""),
    ("inference/tolerance", "tight", "field 'inference.tolerance': expected a number, got \"tight\""),
    ("inference/path", _DELETE, "field 'inference.path': missing"),
    ("files/model.keras/sha256", _DELETE, "field 'files.model.keras.sha256': missing"),
    ("check_set", [500], "field 'check_set': expected a JSON object, got [500]"),
    # A field that may be left out is left out: null is not its type.
    ("preset", None, "field 'preset': expected a string, got null"),
    ("metrics/per_class/3", 5, "field 'metrics.per_class[3]': expected a JSON object, got 5"),
    ("metrics/confusion_matrix/1/2", -1, "field 'metrics.confusion_matrix': expected a list of lists "
     "of counts, got [[929, 0, 4, 2, 1, 11, 27, 1, 5, 0], [0, 1080, -1, 4, 0, 1, 5, 0, 42, 0], [27..."),
    ("hyperparameters/epochs", [1], "field 'hyperparameters': expected an object of scalars, got "
     "{\"name\": \"seed\", \"description\": \"the tutorial: Dense(128, relu) -> Dense(10, ..."),
    ("files/model.keras", "x", "field 'files.model.keras': expected a JSON object, got \"x\""),
    ("data/train_size", -1, "field 'data.train_size': expected a count, got -1"),
    ("metrics/test_loss", float("inf"), "field 'metrics.test_loss': expected a number, got Infinity"),
])
def test_a_missing_or_mistyped_field_is_one_error_naming_the_file_and_the_field(
    field: str, value: Any, error: str
) -> None:
    doc = copy.deepcopy(_fixture())
    _set(doc, field, value)
    path = FIXTURE / METADATA_FILE
    with pytest.raises(CorruptVersionError) as caught:
        Metadata.from_json(doc, path)
    assert str(caught.value) == f"{path}: {error}"


def test_what_the_trainer_may_write_as_null_or_leave_out_reads_back_as_written() -> None:
    """``inference.litert_max_diff`` is null when there was no flatbuffer; NaN and booleans in
    ``hyperparameters`` stay what they are; a section built without a figure leaves it out."""
    doc = copy.deepcopy(_fixture())
    doc["inference"]["litert_max_diff"] = None
    doc["hyperparameters"].update(dropout=float("nan"), augment=True, epochs=1)
    written = Metadata.from_json(doc).to_json()
    assert written["inference"]["litert_max_diff"] is None
    assert json.dumps(written) == json.dumps(doc)  # NaN == NaN as text; True stays true, 1 stays 1
    built = Metadata(name="m", version=1, data=DataInfo(train_size=10, holdout_size=None))
    assert built.to_json() == {"name": "m", "version": 1, "data": {"train_size": 10}}


def test_a_document_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(CorruptVersionError) as caught:
        Metadata.from_json([1], "x/metadata.json")
    assert str(caught.value) == "x/metadata.json: the document: expected a JSON object, got [1]"


def test_unknown_top_level_keys_are_kept_and_sections_a_document_lacks_stay_absent() -> None:
    doc = {"name": "m", "version": 3, "comment": {"by": "hand"}}
    metadata = Metadata.from_json(doc)
    assert metadata.extra == {"comment": {"by": "hand"}} and metadata.input is None
    assert metadata.to_json() == doc
    with pytest.raises(CorruptVersionError) as caught:
        metadata.served_io()
    assert str(caught.value) == "metadata.json: field 'input': missing"


def test_the_server_refuses_a_version_with_a_bad_field_naming_the_file_and_the_field(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """A version whose (checksummed) metadata has a mistyped field is refused before anything is
    loaded, the error naming the file and the field."""
    from digitserve.inference import load_version

    source = tiny_repo / "tiny" / "1"

    def build(staging: Path, version: int) -> dict[str, Any]:
        for path in source.iterdir():
            if path.is_file() and not path.name.startswith(METADATA_FILE):
                shutil.copy(path, staging / path.name)
        doc: dict[str, Any] = json.loads((source / METADATA_FILE).read_text())
        doc.pop("files")
        doc["input"]["shape"] = "28x28"
        return doc

    _, path = ModelRepository(tmp_path).publish("tiny", build)
    with pytest.raises(CorruptVersionError) as caught:
        load_version(path)
    assert str(caught.value) == (f"{path / METADATA_FILE}: field 'input.shape': expected a list of "
                                 "positive integers, got \"28x28\"")
