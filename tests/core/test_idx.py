"""Tests of the IDX reader and writer: round trips and every kind of broken file."""

from __future__ import annotations

import gzip
import hashlib
import struct
import time
from pathlib import Path
from re import escape as _escape
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from digitserve.idx import (
    IdxError,
    Split,
    load_split,
    md5_uncompressed,
    read_idx,
    read_images,
    read_labels,
    split_file_names,
    write_idx,
)


def _images(n: int = 3, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _labels(n: int = 3, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 10, size=n, dtype=np.uint8)


def _idx_bytes(type_code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file built by hand, independently of write_idx."""
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def _write_raw(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def _raises(path: Path, message: str) -> Any:
    """Expects an IdxError whose whole message is ``path: message`` (a regular expression)."""
    return pytest.raises(IdxError, match=f"^{_escape(str(path))}: {message}$")


# --- valid files --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    images, labels = _images(5), _labels(5)
    write_idx(tmp_path / f"i{suffix}", images)
    write_idx(tmp_path / f"l{suffix}", labels)

    got_images = read_images(tmp_path / f"i{suffix}")
    got_labels = read_labels(tmp_path / f"l{suffix}")

    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.flags.writeable
    is_gzip = (tmp_path / f"i{suffix}").read_bytes()[:2] == b"\x1f\x8b"
    assert is_gzip == (suffix == ".gz")


def test_writer_output_matches_the_format_byte_for_byte(tmp_path: Path) -> None:
    images = _images(2)
    write_idx(tmp_path / "i", images)
    assert (tmp_path / "i").read_bytes() == _idx_bytes(0x08, (2, 28, 28), images.tobytes())
    write_idx(tmp_path / "i.gz", images)
    assert gzip.decompress((tmp_path / "i.gz").read_bytes()) == (tmp_path / "i").read_bytes()


def test_gzip_output_is_reproducible(tmp_path: Path) -> None:
    write_idx(tmp_path / "a.gz", _images(4))
    write_idx(tmp_path / "other-name.gz", _images(4))
    a = (tmp_path / "a.gz").read_bytes()
    assert a == (tmp_path / "other-name.gz").read_bytes()
    assert a[3] & 0x08 == 0, "the gzip header holds a file name"
    assert a[4:8] == bytes(4), "the gzip header holds a time"


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    images = _images(2)
    gz_named_plain = tmp_path / "images-idx3-ubyte"
    gz_named_plain.write_bytes(gzip.compress(_idx_bytes(0x08, (2, 28, 28), images.tobytes())))
    plain_named_gz = tmp_path / "images-idx3-ubyte.gz"
    plain_named_gz.write_bytes(_idx_bytes(0x08, (2, 28, 28), images.tobytes()))

    np.testing.assert_array_equal(read_images(gz_named_plain), images)
    np.testing.assert_array_equal(read_images(plain_named_gz), images)


def test_read_idx_returns_declared_shape(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x", _idx_bytes(0x08, (2, 3, 4, 5), bytes(range(120))))
    array = read_idx(path)
    assert array.shape == (2, 3, 4, 5)
    assert array[1, 2, 3, 4] == 119


def test_md5_uncompressed_is_that_of_the_content(tmp_path: Path) -> None:
    content = _idx_bytes(0x08, (4,), bytes([1, 2, 3, 4]))
    expected = hashlib.md5(content).hexdigest()
    assert md5_uncompressed(_write_raw(tmp_path / "l", content)) == expected
    assert md5_uncompressed(_write_raw(tmp_path / "l.gz", content)) == expected


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_split(tmp_path: Path, suffix: str) -> None:
    images_name, labels_name = split_file_names("t10k")
    write_idx(tmp_path / f"{images_name}{suffix}", _images(4))
    write_idx(tmp_path / f"{labels_name}{suffix}", _labels(4))

    split = load_split(tmp_path, "t10k")

    assert isinstance(split, Split)
    assert len(split) == 4
    assert split.images_path == tmp_path / f"{images_name}{suffix}"
    assert split.labels_path == tmp_path / f"{labels_name}{suffix}"
    np.testing.assert_array_equal(split.images, _images(4))
    np.testing.assert_array_equal(split.labels, _labels(4))


def test_load_split_prefers_gz(tmp_path: Path) -> None:
    for suffix, n in ((".gz", 4), ("", 2)):
        write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", _images(n, seed=n))
        write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", _labels(n, seed=n))
    split = load_split(tmp_path, "train")
    assert split.images_path.name == "train-images-idx3-ubyte.gz"
    np.testing.assert_array_equal(split.images, _images(4, seed=4))


def test_load_split_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_split(tmp_path, "test")


def test_reads_60k_images_quickly(tmp_path: Path) -> None:
    images = np.zeros((60000, 28, 28), dtype=np.uint8)
    images[:, 14, 14] = np.arange(60000) % 256
    write_idx(tmp_path / "big", images)
    start = time.monotonic()
    got = read_images(tmp_path / "big")
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(got, images)
    assert elapsed < 2.0, f"reading 60k images took {elapsed:.2f} s"  # ~0.05 s; loops take 30+


# --- broken files -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with _raises(tmp_path / "nope.gz", "no such file"):
        read_images(tmp_path / "nope.gz")
    with _raises(tmp_path / "nope.gz", "no such file"):
        md5_uncompressed(tmp_path / "nope.gz")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty-idx1-ubyte"
    path.write_bytes(b"")
    with _raises(path, "empty file"):
        read_labels(path)


def test_directory_is_not_readable(tmp_path: Path) -> None:
    with pytest.raises(IdxError, match=f"^{_escape(str(tmp_path))}: cannot read: "):
        read_idx(tmp_path)


def test_wrong_magic(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.gz", b"\x12\x34\x08\x03" + b"\x00" * 20)
    with _raises(path, "not an IDX file: magic bytes 12 34 08 03 do not start with 00 00"):
        read_images(path)


def test_labels_file_passed_as_images(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, _labels(3))
    with _raises(
        path,
        _escape(
            "not an images file: magic 2049 (0x00000801) with 1 dimension(s) (a labels file?), "
            "expected 2051 (0x00000803) with 3 dimension(s)"
        ),
    ):
        read_images(path)


def test_images_file_passed_as_labels(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, _images(1))
    with _raises(path, r"not a labels file: magic 2051 .* \(an images file\?\), expected 2049 .*"):
        read_labels(path)


def test_wrong_dimension_count(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "flat.gz", _idx_bytes(0x08, (3, 784), bytes(3 * 784)))
    with _raises(
        path,
        _escape(
            "not an images file: magic 2050 (0x00000802) with 2 dimension(s), "
            "expected 2051 (0x00000803) with 3 dimension(s)"
        ),
    ):
        read_images(path)
    assert read_idx(path).shape == (3, 784)


def test_zero_dimensions(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x", bytes([0, 0, 8, 0]))
    with _raises(path, "header declares 0 dimensions"):
        read_idx(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "x.gz", bytes([0, 0, 8, 3]) + struct.pack(">2I", 1, 28))
    with _raises(path, "truncated header: 3 dimensions need 12 bytes of sizes, file has 8"):
        read_images(path)
    short = _write_raw(tmp_path / "y", bytes([0, 0]))
    with _raises(short, "truncated header: 2 of 4 magic bytes"):
        read_idx(short)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_data(tmp_path: Path, suffix: str) -> None:
    content = _idx_bytes(0x08, (3, 28, 28), _images(3).tobytes())
    path = _write_raw(tmp_path / f"train-images-idx3-ubyte{suffix}", content[:-1])
    with _raises(path, "truncated: header declares 3×28×28 = 2352 bytes of data, file has 2351"):
        read_images(path)


def test_truncated_labels(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "l.gz", _idx_bytes(0x08, (5,), bytes([1, 2, 3])))
    with _raises(path, "truncated: header declares 5 bytes of data, file has 3"):
        read_labels(path)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_trailing_bytes(tmp_path: Path, suffix: str) -> None:
    content = _idx_bytes(0x08, (3, 28, 28), _images(3).tobytes()) + b"extra"
    path = _write_raw(tmp_path / f"x{suffix}", content)
    with _raises(
        path, "5 trailing bytes: header declares 3×28×28 = 2352 bytes of data, file has 2357"
    ):
        read_images(path)


def test_label_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.array([1, 2, 10, 3, 12], dtype=np.uint8))
    with _raises(path, _escape("label 10 at index 2 is out of range 0..9 (2 bad label(s) in all)")):
        read_labels(path)
    with _raises(path, _escape("label 2 at index 1 is out of range 0..1 (4 bad label(s) in all)")):
        read_labels(path, num_classes=2)
    assert read_labels(path, num_classes=13).tolist() == [1, 2, 10, 3, 12]


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", _images(4))
    write_idx(tmp_path / "train-labels-idx1-ubyte", _labels(3))
    images_path = tmp_path / "train-images-idx3-ubyte.gz"
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    with _raises(images_path, f"has 4 images but {_escape(str(labels_path))} has 3 labels"):
        load_split(tmp_path, "train")


def test_load_split_missing_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", _images(2))
    expected = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with _raises(
        expected,
        _escape(
            f"no such file (nor t10k-labels-idx1-ubyte); run `mnist-train fetch --data-dir "
            f"{tmp_path}`"
        ),
    ):
        load_split(tmp_path, "t10k")


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, _images(20))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    with _raises(path, "corrupt gzip data: .+"):
        read_images(path)
    with _raises(path, "corrupt gzip data: .+"):
        md5_uncompressed(path)


def test_cut_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    write_idx(path, _images(20))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with _raises(path, "corrupt gzip data: Compressed file ended before the end-of-stream .*"):
        read_images(path)


@pytest.mark.parametrize(
    ("type_code", "name"), [(0x0D, "float"), (0x09, "signed byte"), (0x42, "unknown")]
)
def test_unsupported_data_type(tmp_path: Path, type_code: int, name: str) -> None:
    path = _write_raw(tmp_path / "x.gz", _idx_bytes(type_code, (2,), bytes(8)))
    with _raises(
        path,
        _escape(
            f"unsupported data type 0x{type_code:02X} ({name}); "
            "only 0x08 (unsigned byte) is supported"
        ),
    ):
        read_idx(path)


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros((2, 28, 28), dtype=np.float32), "cannot write dtype float32: only uint8"),
        (np.zeros((2, 784), dtype=np.uint8), "cannot write 2 dimensions: only 1 or 3"),
    ],
)
def test_write_rejects(tmp_path: Path, array: npt.NDArray[np.generic], problem: str) -> None:
    with _raises(tmp_path / "x.gz", f"{problem} .*"):
        write_idx(tmp_path / "x.gz", array)  # type: ignore[arg-type]


def test_idx_error_is_a_value_error() -> None:
    assert issubclass(IdxError, ValueError)
