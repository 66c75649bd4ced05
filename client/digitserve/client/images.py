"""Turning images into model inputs: PNG/JPEG photos of a digit or .npy arrays (files), and the
arrays or lists a caller of ``DigitClient`` passes (``as_batch``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt


class ImageError(ValueError):
    """Raised when an image file cannot be read or does not fit the model's input."""


def load_image(path: Path, shape: tuple[int, int] = (28, 28)) -> npt.NDArray[np.uint8]:
    """A flat uint8 vector (rows*cols) from a .npy array or a PNG/JPEG picture."""
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        return _load_npy(path, shape)
    return _load_picture(path, shape)


def _load_npy(path: Path, shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ImageError(f"{path}: not a readable .npy array ({exc})") from exc
    size = shape[0] * shape[1]
    if array.size != size:
        raise ImageError(f"{path}: holds {array.size} values of shape {array.shape}; expected {size}")
    flat = array.reshape(size)
    if flat.dtype == np.uint8:
        return np.asarray(flat, dtype=np.uint8)
    if not np.issubdtype(flat.dtype, np.number):
        raise ImageError(f"{path}: dtype {flat.dtype} is not numeric")
    values = flat.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageError(f"{path}: holds NaN or infinite values")
    if values.min() >= 0 and values.max() <= 1:
        return np.asarray(np.rint(values * 255), dtype=np.uint8)
    if values.min() >= 0 and values.max() <= 255:
        return np.asarray(np.rint(values), dtype=np.uint8)
    raise ImageError(f"{path}: values span {values.min()}..{values.max()}; expected 0..1 or 0..255")


def _load_picture(path: Path, shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """MNIST-style preprocessing: grey, white ink on black, the digit fitted into a 20×20 box and
    centred by its centre of mass in the 28×28 frame (as the MNIST images were made)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("L")
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from exc
    grey = np.asarray(image, dtype=np.float64)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if border.mean() > 127:  # dark ink on a light background: invert to MNIST's convention
        grey = 255.0 - grey
    grey -= np.median(border if border.mean() <= 127 else 255.0 - border)
    grey = np.clip(grey, 0, 255)
    if grey.max() <= 0:
        raise ImageError(f"{path}: the picture is blank; expected a digit")
    grey *= 255.0 / grey.max()
    ink = np.argwhere(grey > 0.1 * 255)
    (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0) + 1
    crop = Image.fromarray(grey[top:bottom, left:right].astype(np.uint8))
    rows, cols = shape
    box = max(1, round(min(rows, cols) * 20 / 28))
    scale = box / max(crop.size)
    new_size = (max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale)))
    digit = np.asarray(crop.resize(new_size, Image.Resampling.LANCZOS), dtype=np.float64)
    digit = np.clip(digit, 0, 255)
    frame = np.zeros((rows, cols), dtype=np.float64)
    total = digit.sum()
    cy = (digit.sum(axis=1) * np.arange(digit.shape[0])).sum() / total
    cx = (digit.sum(axis=0) * np.arange(digit.shape[1])).sum() / total
    y0 = int(np.clip(round(rows / 2 - cy), 0, rows - digit.shape[0]))
    x0 = int(np.clip(round(cols / 2 - cx), 0, cols - digit.shape[1]))
    frame[y0 : y0 + digit.shape[0], x0 : x0 + digit.shape[1]] = digit
    return np.rint(frame).astype(np.uint8).reshape(rows * cols)


def _dims(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape) or "() (a single number)"


_KINDS = {"b": "booleans", "U": "strings", "S": "bytes", "O": "Python objects (a ragged or mixed "
          "list?)", "c": "complex numbers", "M": "datetimes", "m": "timedeltas"}


def pixel_values(images: npt.ArrayLike) -> npt.NDArray[np.uint8] | npt.NDArray[np.float32]:
    """The pixels of ``images`` as the wire carries them, decided for the whole array by its dtype
    and range: integers (any integer dtype, Python ints) are intensities 0..255, sent as bytes;
    floats whose values all lie in [0, 1] are intensities in [0, 1], sent as float32; floats with
    a value above 1 and none above 255 are intensities 0..255, divided by 255 (as the server
    scales bytes, so whole numbers give the same probabilities as bytes) and sent as float32.
    Anything else (booleans, text, NaN, values out of range) raises ImageError in the caller's
    terms."""
    try:
        array = np.asarray(images)
    except ValueError as exc:  # a ragged list
        raise ImageError(f"images: not a rectangular array of numbers ({exc})") from None
    if array.size == 0:
        raise ImageError(f"images: no pixels (shape {array.shape})")
    if array.dtype.kind in "ui":
        least, most = int(array.min()), int(array.max())
        if least < 0 or most > 255:
            raise ImageError(f"images ({array.dtype}): values {least}..{most} are outside 0..255; "
                             "integer pixels are intensities 0..255")
        return array.astype(np.uint8, copy=False)
    if array.dtype.kind != "f":
        kind = _KINDS.get(array.dtype.kind, f"dtype {array.dtype}")
        raise ImageError(f"images: {kind} are not pixels; expected integers 0..255 or floats in "
                         "0..1 or 0..255")
    if not np.isfinite(array).all():
        raise ImageError(f"images ({array.dtype}): hold NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ImageError(f"images ({array.dtype}): values {low:g}..{high:g} are outside 0..1 and "
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
