"""Turning images into model inputs: PNG/JPEG pictures of a digit (preprocessed by
``digitserve.pictures``, the server's own code) or .npy arrays (files), and the arrays or lists a
caller of ``DigitClient`` passes (``as_batch``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from digitserve import pictures
from digitserve.client.errors import DigitServeError

__all__ = ["PREPROCESS", "ImageError", "Picture", "Preprocess", "as_batch", "is_picture",
           "load_image", "load_picture", "pictures_of", "pixel_values", "read_pictures"]

Picture = bytes | os.PathLike[str]
"""A picture as DigitClient.predict takes it: a PNG or JPEG file's bytes, or its path (a
``pathlib.Path``; a ``str`` is not taken for a path: strings were never pixels either, and are
refused as such)."""
Preprocess = Literal["client", "server"]
PREPROCESS: tuple[str, ...] = get_args(Preprocess)


class ImageError(DigitServeError, pictures.ImageError):
    """Images the client will not send: one line saying what was passed and what is expected. A
    ``ValueError``, and the ``digitserve.pictures.ImageError`` of a picture that does not decode."""


def load_picture(item: bytes | Path, shape: Sequence[int]) -> npt.NDArray[np.uint8]:
    """The model's pixels (flat uint8) of one picture, preprocessed here (``digitserve.pictures``)."""
    try:
        return pictures.from_bytes(item, shape) if isinstance(item, bytes) else \
            pictures.from_file(item, shape)
    except pictures.ImageError as exc:
        raise ImageError(str(exc)) from None


def is_picture(path: Path) -> bool:
    """Whether ``path`` names a picture (PNG or JPEG) rather than a .npy array."""
    return path.suffix.lower() != ".npy"


def pictures_of(images: object) -> list[bytes | Path] | None:
    """``images`` as pictures (bytes, or paths) when it is one picture or a list or tuple of
    them; None when it is pixels (an array, nested lists of numbers). ImageError for a list that
    mixes pictures with anything else."""
    def one(item: object) -> bytes | Path | None:
        if isinstance(item, bytes | bytearray | memoryview):
            return bytes(item)
        if isinstance(item, os.PathLike):
            return Path(item)
        return None

    single = one(images)
    if single is not None:
        return [single]
    if not isinstance(images, list | tuple) or not images:
        return None
    found = [one(item) for item in images]
    if all(f is None for f in found):
        return None
    if any(f is None for f in found):
        k = found.index(None)
        raise ImageError(f"images[{k}]: {type(images[k]).__name__} among pictures; expected a "
                         "list of pictures only (bytes of a PNG or JPEG file, or paths) or pixels only")
    return [f for f in found if f is not None]


# The most bytes of pictures one request sends (the server's --max-picture-request-bytes, less room
# for the rest of the message within gRPC's 16 MiB).
MAX_REQUEST_PICTURE_BYTES = 16 * 1024 * 1024 - 64 * 1024


def read_pictures(items: Sequence[bytes | Path], max_bytes: int = pictures.MAX_BYTES,
                  max_request_bytes: int = MAX_REQUEST_PICTURE_BYTES) -> list[bytes]:
    """The bytes of each picture: as given, or read from its path; ImageError naming it, with
    the line the client's own preprocessing gives, for one over ``max_bytes`` (the server's
    --max-picture-bytes default) and for pictures over ``max_request_bytes`` together, before
    anything is sent (gRPC would refuse the message with its own error)."""
    out, total = [], 0
    for item in items:
        if isinstance(item, bytes):
            if len(item) > max_bytes:
                raise ImageError(f"{len(item)} bytes exceed the limit of {max_bytes} bytes per picture")
            out.append(item)
        else:
            try:
                size = item.stat().st_size
                if size > max_bytes:  # as pictures.from_file says it
                    raise ImageError(f"{item}: {size} bytes exceed the limit of {max_bytes} bytes "
                                     "per picture")
                out.append(item.read_bytes())
            except OSError as exc:
                raise ImageError(f"{item}: cannot be read ({exc.strerror or exc})") from None
        total += len(out[-1])
    if total > max_request_bytes:
        raise ImageError(f"{len(out)} pictures of {total} bytes exceed the limit of {max_request_bytes} "
                         "bytes of pictures per request; send fewer per call, or preprocess them here "
                         "(preprocess='client')")
    return out


def load_image(path: Path, shape: tuple[int, int] = (28, 28)
               ) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    """A flat vector (rows*cols) of pixels from a .npy array (read as ``pixel_values`` reads an
    array) or a PNG/JPEG picture (uint8, preprocessed as MNIST's images were:
    ``digitserve.pictures``)."""
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return load_picture(path, shape) if is_picture(path) else _load_npy(path, shape)


def _load_npy(path: Path, shape: tuple[int, int]
              ) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    """The pixels of a .npy array of one image, read by ``pixel_values``' rule: the rule
    ``DigitClient.predict`` applies to the same array passed in memory."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ImageError(f"{path}: not a readable .npy array ({exc})") from exc
    size = shape[0] * shape[1]
    if array.size != size:
        raise ImageError(f"{path}: holds {array.size} values of shape {array.shape}; expected {size}")
    return pixel_values(array.reshape(size), str(path))


def _dims(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape) or "() (a single number)"


_KINDS = {"b": "booleans", "U": "strings", "S": "bytes", "O": "Python objects (a ragged or mixed "
          "list?)", "c": "complex numbers", "M": "datetimes", "m": "timedeltas"}


def pixel_values(images: npt.ArrayLike, what: str = "images"
                 ) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    """The pixels of ``images`` as the wire carries them: the one rule of the library
    (``DigitClient.predict``, ``evaluate``) and of ``mnist-client predict --image x.npy``, decided
    for the whole array by its dtype and range. Integers (any integer dtype, Python ints) are
    intensities 0..255, sent as bytes, except an array of only 0s and 1s with at least one 1: a
    mask such as ``(x > 127).astype(int)``, 1 meaning ink (255), 0 background (0), since as
    intensities it would be a black image. Floats whose values all lie in [0, 1] are intensities in
    [0, 1], sent as float32; floats with a value above 1 and none above 255 are intensities
    0..255, divided by 255 (as the server scales bytes, so whole numbers give the same
    probabilities as bytes) and sent as float32. Anything else (booleans, text, NaN, values out of
    range) raises ImageError naming ``what``."""
    try:
        array = np.asarray(images)
    except ValueError as exc:  # a ragged list
        raise ImageError(f"{what}: not a rectangular array of numbers ({exc})") from None
    if array.size == 0:
        raise ImageError(f"{what}: no pixels (shape {array.shape})")
    if array.dtype.kind in "ui":
        least, most = int(array.min()), int(array.max())
        if least < 0 or most > 255:
            raise ImageError(f"{what} ({array.dtype}): values {least}..{most} are outside 0..255; "
                             "integer pixels are intensities 0..255")
        if most == 1:  # a 0/1 mask
            return np.asarray(array * 255, dtype=np.uint8)
        return array.astype(np.uint8, copy=False)
    if array.dtype.kind != "f":
        kind = _KINDS.get(array.dtype.kind, f"dtype {array.dtype}")
        raise ImageError(f"{what}: {kind} are not pixels; expected integers 0..255 or floats in "
                         "0..1 or 0..255")
    if not np.isfinite(array).all():
        raise ImageError(f"{what} ({array.dtype}): hold NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ImageError(f"{what} ({array.dtype}): values {low:g}..{high:g} are outside 0..1 and "
                         "0..255; float pixels are intensities in 0..1 (or 0..255)")
    if high <= 1:
        return np.asarray(array, dtype="<f4")
    scaled: npt.NDArray[np.float32] = array.astype(np.float32) / np.float32(255)
    return scaled


def as_batch(images: npt.ArrayLike, input_shape: Sequence[int]
             ) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    """A batch (N, pixels) of ``images`` for a model whose input is ``input_shape`` (rows, cols):
    one image as rows×cols or as a flat vector of rows*cols pixels, or a batch as N×rows×cols or
    N×pixels; an array or nested lists, of the values ``pixel_values`` takes."""
    values = pixel_values(images)
    shape = tuple(int(d) for d in input_shape)
    size = int(np.prod(shape))
    if values.shape in (shape, (size,)):
        return values.reshape(1, size)
    if values.ndim >= 2 and values.shape[1:] in (shape, (size,)):
        return values.reshape(values.shape[0], size)
    raise ImageError(
        f"images of shape {_dims(values.shape)}: expected one image ({_dims(shape)} or {size} "
        f"values) or a batch (N×{_dims(shape)} or N×{size})")
