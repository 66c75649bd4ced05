"""Turning image files into model inputs: PNG/JPEG photos of a digit, or .npy arrays."""

from __future__ import annotations

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
