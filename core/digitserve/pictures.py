"""Pictures of a digit (PNG, JPEG or WebP, HEIC with the heic extra: a photo, a scan, a drawing)
turned into a model's pixels the way the MNIST images were made: the one preprocessing of the
server, ``mnist-client`` and ``DigitClient``, with numpy and Pillow only (the client installs
nothing else).

1. ``read_grey``: PNG, JPEG, WebP (HEIC with pillow-heif) only, bounded in encoded bytes, pixels
   and decoded bytes (the last two read from the header: a decompression bomb is refused
   unread); EXIF orientation applied, alpha composed onto a background opposite to the ink,
   reduced to ``WORK_SIDE`` pixels a side (a large JPEG by libjpeg's DCT scaling). Peak memory
   is about the decoded bytes.
2. ``ink_contrast``: the paper's lighting is a quadratic surface fitted robustly (least median of
   squares on cell medians, then the paper's pixels), or a closing where a shadow's edge lies
   towards the ink; the ink is the side of the paper with the larger far outliers (dark ink or
   chalk on a board); contrast is relative to the room the paper leaves.
3. ``digit_mask``: Otsu's threshold, 8-connected pieces below 5 % of the largest dropped, a blank
   picture refused; soft edges kept as MNIST's anti-aliased ones.
4. ``normalise``: MNIST's own: thin strokes thickened, the longer side scaled to 20 of 28 pixels,
   intensities stretched to 255, centre of mass at (14, 14) (an MNIST image comes back within a
   few grey levels).

Measured on the photo set (``python -m bench.photoset``; docs/interoperability.md): see there.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)
_F64 = npt.NDArray[np.float64]

FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow's own decoders; HEIF too with the heic extra (_formats)
NAMES = "PNG, JPEG or WebP"
HEIC_EXTRA = ("a HEIC (HEIF) picture, which needs the heic extra: pip install 'digitserve[heic]' "
              "(pillow-heif); or convert it to JPEG or PNG")
# The ISO base media brands of HEIF still pictures (HEVC-coded ones: what phones write).
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
MAX_BYTES = 8 * 1024 * 1024  # encoded bytes of one picture (a 12-megapixel phone JPEG is 2–5 MB)
MAX_PIXELS = 4096 * 4096  # decoded width × height: a 12-megapixel photo (4032×3024) fits
MAX_DECODED_BYTES = 48 * 1024 * 1024
"""Bytes one picture may decode to (``decoded_bytes``): a 12-megapixel photo fits (4:2:0 JPEG, 8-bit
RGB(A) PNG held as 4 bytes a pixel), as any grey picture within MAX_PIXELS; a 4096×4096 RGBA PNG
(64 MiB, 75 KB when transparent) does not."""
BAND_PIXELS = 1 << 16  # bands in which alpha or 16 bits is turned grey: float64 work stays small
WORK_SIDE = 320  # longest side worked on: enough for a digit that ends up 20 pixels tall
BOX = 20 / 28  # MNIST: the digit's longer side fills 20 of the frame's 28 pixels
MIN_CONTRAST = 0.1  # the ink must differ from the paper by 10 % at least
MIN_PIECE = 0.05  # pieces of ink below this fraction of the largest one are noise
EDGE = 0.2  # a digit's soft edge: down to this fraction of its strokes' contrast
THINNEST = 0.08  # MNIST's thinnest strokes (its 10th percentile), a fraction of the 20-pixel box


def is_heif(data: bytes) -> bool:
    """Whether ``data`` starts as a HEIF picture does (an ISO base media ``ftyp`` box of its brands)."""
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


_heif: list[bool] = []  # whether pillow-heif's opener is registered (decided once)


def _formats() -> tuple[str, ...]:
    """The formats read: FORMATS, and HEIF where pillow-heif (the heic extra) is installed; its
    opener is registered with Pillow on first use."""
    if not _heif:
        try:
            import pillow_heif  # type: ignore[import-not-found,unused-ignore]  # the heic extra
        except ImportError:
            _heif.append(False)
        else:
            pillow_heif.register_heif_opener()
            _heif.append(True)
    return (*FORMATS, "HEIF") if _heif[0] else FORMATS


class ImageError(ValueError):
    """A picture or an array that cannot be turned into a model's pixels: one line saying what is
    wrong and what is expected."""


def read_grey(data: bytes, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
              max_decoded_bytes: int = MAX_DECODED_BYTES,
              work_side: int = WORK_SIDE) -> _F64:
    """The picture in ``data`` (PNG, JPEG, WebP; HEIC with the heic extra) as grey levels 0..255, at
    most ``work_side`` pixels a side. ImageError: too large (pixels and decoded bytes read from the
    header), not a picture of those formats, corrupt or truncated."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ImageError(f"{len(data)} bytes exceed the limit of {max_bytes} bytes per picture")
    if not data:
        raise ImageError(f"empty; expected the bytes of a {NAMES} picture")
    formats = _formats()
    if is_heif(data) and "HEIF" not in formats:
        raise ImageError(HEIC_EXTRA)
    try:
        with warnings.catch_warnings():  # our own bound (below) is lower than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:  # beyond twice Pillow's own bound (~179 MP)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else "more than 178956970"
        raise ImageError(f"{pixels} pixels exceed the limit of {max_pixels} pixels per picture") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a {NAMES} image (it starts with {data[:8]!r})") from None
    except Exception as exc:  # a header that does not parse
        raise ImageError(f"not a readable {NAMES} image ({_reason(exc)})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{width}×{height} pixels exceed the limit of {max_pixels} pixels per "
                             "picture")
        if image.format == "JPEG" and max(width, height) > work_side:  # libjpeg decodes at 1/2,
            scale = work_side / max(width, height)                     # 1/4 or 1/8 of the size
            image.draft("L", (max(1, int(width * scale)), max(1, int(height * scale))))
        held, kind, advice = decoded_bytes(image, data, (width, height))
        if held > max_decoded_bytes:
            raise ImageError(f"{width}×{height} pixels of {kind} decode to {held} bytes, over the limit of "
                             f"{max_decoded_bytes} decoded bytes per picture; send {advice}")
        try:
            return _decoded(image, work_side)
        except Exception as exc:  # Pillow's decoders raise many types for corrupt data
            raise ImageError(f"corrupt or truncated {image.format} data ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    """An exception of Pillow's as a short phrase (its first line, no object addresses)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = re.sub(r" ?<[^>]* at 0x[0-9a-f]+>", "", text)
    return text[:120] or type(exc).__name__


# Decoded bytes -------------------------------------------------------------------------------

_PNG_COLOURS = {0: ("grey", 1), 2: ("RGB", 3), 3: ("palette", 1), 4: ("grey and alpha", 2),
                6: ("RGBA", 4)}  # a PNG's colour type: its name and samples per pixel


def _held_per_pixel(mode: str) -> int:
    """Bytes per pixel of Pillow's image of ``mode`` in memory (RGB takes 4, as RGBA)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def decoded_bytes(image: Any, data: bytes, size: tuple[int, int]) -> tuple[int, str, str]:
    """What decoding the opened ``image`` of ``data`` (``size`` pixels) would hold, read from its
    header: bytes, the kind of picture, and what to send instead. A PNG: pixels × the larger of
    its samples' bytes and Pillow's; a JPEG: its drafted pixels × Pillow's bytes, plus 2 bytes per
    DCT coefficient when libjpeg buffers the whole picture (progressive or multi-scan)."""
    width, height = size
    if image.format == "PNG" and data[12:16] == b"IHDR" and data[25] in _PNG_COLOURS:
        depth, (colour, channels) = data[24], _PNG_COLOURS[data[25]]
        per_pixel = max(channels * (2 if depth > 8 else 1), _held_per_pixel(image.mode))
        return width * height * per_pixel, f"{depth}-bit {colour}", "fewer pixels or 8 bits per sample"
    if image.format in ("WEBP", "HEIF"):  # decoded into Pillow's image of its mode, RGB(A) 4 a pixel
        return width * height * _held_per_pixel(image.mode), f"{image.format} {image.mode}", "fewer pixels"
    if image.format != "JPEG":  # a PNG header Pillow read but this does not: count the most
        return width * height * 8, f"{image.format} {image.mode}", "fewer pixels"
    drafted_w, drafted_h = image.size
    held = drafted_w * drafted_h * _held_per_pixel(image.mode)
    layers = getattr(image, "layer", None) or [(1, 1, 1, 0)] * len(image.getbands())
    progressive = bool(image.info.get("progressive"))
    scan = _first_scan_components(data)
    if progressive or scan is None or scan < len(layers):
        h_max = max(layer[1] for layer in layers)
        v_max = max(layer[2] for layer in layers)
        for _, h, v, _ in layers:  # libjpeg's coefficient arrays: whole 8×8 blocks of int16
            held += -(-width * h // (8 * h_max)) * -(-height * v // (8 * v_max)) * 64 * 2
        kind = "progressive JPEG" if progressive else "multi-scan JPEG"
        return held, kind, "fewer pixels or a baseline (sequential) JPEG"
    return held, "JPEG", "fewer pixels"


def _first_scan_components(data: bytes) -> int | None:
    """The number of components in a JPEG's first scan (SOS), None when the markers do not parse."""
    pos = 2  # after SOI
    while pos + 4 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # SOS: length (2 bytes), then Ns
            return data[pos + 4]
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


# Decoding ------------------------------------------------------------------------------------

_OPAQUE_MODES = ("1", "L", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "P")  # Pillow's "L" is right for them


def _decoded(image: Any, work_side: int) -> _F64:
    """The opened ``image`` decoded, grey and reduced to at most ``work_side`` pixels a side."""
    from PIL import Image, ImageOps

    if image.mode in _OPAQUE_MODES and "transparency" not in image.info:
        grey = image if image.mode == "L" else image.convert("L")
        if grey is not image:
            image.close()  # the decoded colours are not needed any more: free them now
        ImageOps.exif_transpose(grey, in_place=True)  # grey levels commute with a rotation
        factor = -(-max(grey.size) // work_side)  # an area average of factor² pixels, in C
        if factor > 1:
            grey = grey.reduce(factor)
        return np.asarray(grey, dtype=np.float64)
    ImageOps.exif_transpose(image, in_place=True)  # a copy only when the picture is rotated
    width, height = image.size
    factor = -(-max(width, height) // work_side)
    if factor == 1:
        return _grey(image)
    # transparency, 16 bits: in numpy, by bands of whole rows of factor×factor boxes, reduced the
    # same way as a whole (a box never straddles two bands)
    band = factor * max(1, BAND_PIXELS // (width * factor))
    alpha = not (image.mode.startswith("I;16") or image.mode in ("I", "F"))  # what _grey composes
    dark = _opaque_is_dark(image, band) if alpha else True
    parts = []
    for top in range(0, height, band):
        grey = _grey(image.crop((0, top, width, min(height, top + band))), dark)
        reduced = Image.fromarray(grey.astype(np.float32), mode="F").reduce(factor)
        parts.append(np.asarray(reduced, dtype=np.float64))
    return np.concatenate(parts)


def _opaque_is_dark(image: Any, band: int) -> bool:
    """Whether the opaque pixels (alpha above half) are dark on average (or there is none), read
    by bands of ``band`` rows with integer sums: the answer of the whole picture's mean."""
    width, height = image.size
    total = count = 0
    for top in range(0, height, band):
        la = np.asarray(image.crop((0, top, width, min(height, top + band))).convert("LA"))
        opaque = la[..., 1] / 255.0 > 0.5
        total += int(la[..., 0][opaque].sum(dtype=np.int64))
        count += int(opaque.sum())
    return count == 0 or total < 128 * count


def _grey(image: Any, dark: bool | None = None) -> _F64:
    """Grey levels 0..255 of a picture with transparency (composed onto a background opposite to
    the ink, ``dark`` or the opaque pixels' mean) or 16 bits (scaled to 8)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit PNG: Pillow's "L" would clip at 255
        sixteen: _F64 = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return np.clip(sixteen, 0, 255)
    if mode == "F":
        return np.clip(np.asarray(image, dtype=np.float64), 0, 255)
    la = np.asarray(image.convert("LA"), dtype=np.float64)
    grey, alpha = la[..., 0], la[..., 1] / 255.0
    if dark is None:
        opaque = alpha > 0.5
        dark = not opaque.any() or grey[opaque].mean() < 128
    background = 255.0 if dark else 0.0
    composed: _F64 = grey * alpha + background * (1 - alpha)
    return composed


# Lighting -----------------------------------------------------------------------------------


def _axes(rows: int, cols: int, step: int = 1) -> tuple[_F64, _F64]:
    """Row and column coordinates scaled to [0, 1], every ``step``-th."""
    y = np.arange(0, rows, step, dtype=np.float64) / max(rows - 1, 1)
    x = np.arange(0, cols, step, dtype=np.float64) / max(cols - 1, 1)
    return y, x


def _surface(coef: _F64, y: _F64, x: _F64) -> _F64:
    """c0 + c1·x + c2·y + c3·x² + c4·x·y + c5·y² on the grid y × x, in three array operations."""
    c0, c1, c2, c3, c4, c5 = coef.tolist()
    surface: _F64 = (c0 + c2 * y + c5 * y * y)[:, None] + (c1 * x + c3 * x * x)[None, :] + np.outer(c4 * y, x)
    return surface


def _design(y: _F64, x: _F64) -> _F64:
    """The quadratic surface's terms (1, x, y, x², xy, y²) at points (y, x), one row each."""
    design: _F64 = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
    return design


def _fit(design: _F64, values: _F64) -> _F64:
    """Least-squares coefficients by the normal equations (a 6×6 solve: numpy's lstsq costs ~50×
    more for the same fit)."""
    coef = np.linalg.solve(design.T @ design + 1e-9 * np.eye(6), design.T @ values)
    return np.asarray(coef, dtype=np.float64)


def _least_median(design: _F64, values: _F64, trials: int = 96) -> _F64:
    """Rousseeuw's least median of squares among fits to ``trials`` random sets of 8 points (a fixed
    seed: the same picture gives the same pixels); right while the ink leaves half of the points."""
    if values.size < 16:
        return _fit(design, values)
    picks = np.random.default_rng(0).integers(0, values.size, size=(trials, 8))
    a = design[picks]  # (trials, 8, 6)
    gram = np.einsum("tki,tkj->tij", a, a) + 1e-6 * np.eye(6)
    rhs = np.einsum("tki,tk->ti", a, values[picks])
    coefs = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (trials, 6)
    residuals = np.abs(values[None, :] - coefs @ design.T)
    best: _F64 = coefs[int(np.argmin(np.median(residuals, axis=1)))]
    return best


def _mad(values: _F64) -> float:
    return 1.4826 * float(np.median(np.abs(values))) + 1e-6


def ink_is_dark(small: _F64, medians: _F64) -> bool:
    """Whether the ink is darker than the paper, from the picture at ~64 px a side (``small``) and
    its 4×4-pixel cells' ``medians``: the paper's level is each 3×3 cells' median, and the ink is
    the side of it with the larger far outliers."""
    padded = np.pad(medians, 1, mode="edge")
    nr, nc = medians.shape
    level = np.median(np.stack([padded[i : i + nr, j : j + nc] for i in range(3) for j in range(3)]),
                      axis=0)
    residual = small - np.kron(level, np.ones((small.shape[0] // nr, small.shape[1] // nc)))
    spread = _mad(residual)
    far = np.abs(residual) > 3 * spread
    return float(-residual[far & (residual < 0)].sum()) >= float(residual[far & (residual > 0)].sum())


def paper(grey: _F64) -> tuple[_F64, float, bool]:
    """The paper's brightness (a quadratic surface in x and y), the paper's noise (a robust spread)
    and whether the ink is darker. Fitted by least median of squares to up to 16×16 cell medians,
    trimmed, then refitted to ~4,000 pixels without the ink (2.5 spreads on the ink's side)."""
    from PIL import Image

    rows, cols = grey.shape
    sub = 4  # each cell: the median of 4×4 area means of the picture reduced to 64 px a side
    scale = min(1.0, 16 * sub / max(rows, cols))
    nr, nc = max(1, round(rows * scale / sub)), max(1, round(cols * scale / sub))
    small = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize(
        (nc * sub, nr * sub), Image.Resampling.BOX), dtype=np.float64)
    grid = np.median(small.reshape(nr, sub, nc, sub).transpose(0, 2, 1, 3).reshape(nr, nc, -1), axis=-1)
    medians = grid.ravel()
    by, bx = (a.ravel() for a in np.meshgrid((np.arange(nr) + 0.5) / nr * rows / max(rows - 1, 1),
                                             (np.arange(nc) + 0.5) / nc * cols / max(cols - 1, 1),
                                             indexing="ij"))
    cells = _design(by, bx)
    coef = _least_median(cells, medians)
    residual = medians - cells @ coef
    keep = np.abs(residual) < 2.5 * _mad(residual)
    if keep.sum() >= 12:
        coef = _fit(cells[keep], medians[keep])
    step = max(1, int(np.sqrt(rows * cols / 4000)))
    y, x = _axes(rows, cols, step)
    design = _design(*(a.ravel() for a in np.meshgrid(y, x, indexing="ij")))
    sample = grey[::step, ::step].ravel()
    residual = sample - design @ coef
    spread = _mad(residual)
    dark = ink_is_dark(small, grid)
    sign = -1.0 if dark else 1.0
    for _ in range(3):
        keep = (sign * residual < 2.5 * spread) & (sign * residual > -5 * spread)
        if keep.sum() < 24:
            break
        coef = _fit(design[keep], sample[keep])
        residual = sample - design @ coef
        spread = _mad(residual[keep])
    return _surface(coef, *_axes(rows, cols)), spread, dark


def _relative(grey: _F64, level: _F64, dark: bool) -> _F64:
    """Contrast against the paper's ``level``: the difference over the room there is (the paper's
    brightness for dark ink, so dim light counts as bright; what is left to white for light ink)."""
    if dark:
        out: _F64 = (level - grey) / np.maximum(level, 32.0)
    else:
        out = (grey - level) / np.maximum(255.0 - level, 32.0)
    return out


def _closing(values: _F64, radius: int, dark: bool) -> _F64:
    """A grey closing over a (2r+1)-square (``dark``; else an opening), the picture extended by its
    edge values first so that a lighting gradient into the border is kept."""
    padded = np.pad(values, radius, mode="edge")
    sign = 1.0 if dark else -1.0
    out = -_grow(-_grow(sign * padded, radius), radius) * sign
    return out[radius:-radius, radius:-radius] if radius > 0 else out


def closed_paper(grey: _F64, dark: bool, radius: int) -> _F64:
    """The paper's brightness where a smooth surface cannot follow the lighting (a shadow's edge):
    the picture closed over (2r+1)² pixels, at half size and smoothed (speed, noise)."""
    from PIL import Image

    rows, cols = grey.shape
    scale = 0.5 if min(rows, cols) >= 64 else 1.0
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    small = Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX)
    padded = np.pad(np.asarray(small, dtype=np.float64), 1, mode="edge")
    values: _F64 = np.mean(
        [padded[i : i + size[1], j : j + size[0]] for i in range(3) for j in range(3)], axis=0)
    r = max(1, int(np.ceil(radius * scale)))
    out = _closing(values, r, dark)
    full = Image.fromarray(out.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BILINEAR)
    return np.asarray(full, dtype=np.float64)


def ink_contrast(grey: _F64) -> tuple[_F64, float]:
    """Each pixel's contrast against the paper (0: paper; 1: as far as can be) and the noise in the
    same units. The paper is ``paper``'s surface, except where ``closed_paper`` lies nearer the
    ink (a shadow: the closing follows a step the surface cannot; the surface is unbiased by noise)."""
    surface, spread, dark = paper(grey)
    contrast = _relative(grey, surface, dark)
    noise = spread / float(np.median(np.maximum(surface if dark else 255.0 - surface, 32.0)))
    first = contrast > max(otsu(np.clip(contrast, 0, None)), 3 * noise, MIN_CONTRAST / 2)
    if first.any():
        # Wider than the strokes (those of the first look at the ink, unless a shadow took part
        # in it: no stroke is wider than a tenth of the picture).
        radius = min(int(2 * stroke_width(first)) + 2, max(2, round(0.1 * min(grey.shape))))
        local = closed_paper(grey, dark, radius)
        # The closing where it lies towards the ink by 10 % or more (a shadow), the surface where
        # they agree within 5 % (the closing's own bias: noise raises a maximum), blended between.
        toward_ink = _relative(local, surface, dark)
        weight = np.clip((toward_ink - 0.05) / 0.05, 0.0, 1.0)
        level = weight * local + (1 - weight) * surface
        contrast = _relative(grey, level, dark)
        step = max(1, int(np.sqrt(contrast.size / 4000)))
        noise = _mad(contrast[::step, ::step])
    return np.clip(contrast, 0.0, None), noise


def otsu(values: _F64, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a ``bins``-bin histogram maximising between-class variance."""
    high = float(values.max())
    if high <= 0:
        return 0.0
    index = np.minimum((values.ravel() * (bins / high)).astype(np.intp), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    centres = (np.arange(bins) + 0.5) * (high / bins)
    weight = np.cumsum(counts)
    mass = np.cumsum(counts * centres)
    total, total_mass = weight[-1], mass[-1]
    upper = total - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = mass / weight
        mean_high = (total_mass - mass) / upper
        between = weight * upper * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between[:-1], nan=0.0)
    return float((int(np.argmax(between)) + 1) * (high / bins))


# Ink ----------------------------------------------------------------------------------------


def components(mask: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """8-connected components of ``mask``: a label per pixel (0: none) and each label's pixel count,
    by union-find over each row's runs (a digit is a few hundred)."""
    rows, cols = mask.shape
    padded = np.zeros((rows, cols + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    starts_r, starts_c = np.nonzero(edges == 1)
    _, ends_c = np.nonzero(edges == -1)
    count = starts_r.size
    labels = np.zeros(mask.shape, dtype=np.int32)
    if count == 0:
        return labels, np.zeros(1, dtype=np.int64)
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(starts_r, np.arange(rows + 1))
    s_list, e_list = starts_c.tolist(), ends_c.tolist()  # run k covers columns [s, e)
    for row in range(1, rows):
        a0, a1 = int(row_first[row - 1]), int(row_first[row])
        b0, b1 = a1, int(row_first[row + 1])
        i = a0
        for j in range(b0, b1):
            s, e = s_list[j], e_list[j]
            while i < a1 and e_list[i] < s:  # runs above that end before this one's reach
                i += 1
            k = i
            while k < a1 and s_list[k] <= e:  # 8-connected: touching diagonally counts
                ri, rj = find(k), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
                k += 1
    roots = np.array([find(k) for k in range(count)])
    _, run_label = np.unique(roots, return_inverse=True)
    run_label = run_label + 1
    lengths = ends_c - starts_c
    sizes = np.bincount(run_label, weights=lengths).astype(np.int64)
    for k in range(count):  # paint the runs
        labels[starts_r[k], s_list[k] : e_list[k]] = run_label[k]
    return labels, sizes


def digit_mask(contrast: _F64, noise: float) -> tuple[npt.NDArray[np.bool_], float]:
    """The pixels of the digit (the pieces of ink kept) and the threshold; ImageError when no ink
    stands out of the paper."""
    threshold = max(otsu(contrast), MIN_CONTRAST / 2, 3 * noise)
    mask = contrast > threshold
    if not mask.any() or float(np.percentile(contrast[mask], 90)) < max(MIN_CONTRAST, 6 * noise):
        raise ImageError("the picture is blank (no ink stands out of the background); expected a "
                         "digit")
    labels, sizes = components(mask)
    keep = sizes >= MIN_PIECE * sizes[1:].max()
    keep[0] = False
    return keep[labels], threshold


# MNIST's normalisation ------------------------------------------------------------------------


def _window_max(values: _F64, width: int, axis: int) -> _F64:
    """The maximum of each run of ``width`` values along ``axis`` (the axis shrinks by width - 1),
    in log2(width) + 1 array operations (runs of 1, 2, 4, ..., then two overlapping)."""
    m = np.moveaxis(values, axis, 0)
    span = 1
    while span * 2 <= width:
        m = np.maximum(m[:-span], m[span:])
        span *= 2
    if span < width:
        m = np.maximum(m[: m.shape[0] - (width - span)], m[width - span :])
    return np.moveaxis(m, 0, axis)


def _grow(values: _F64, radius: int) -> _F64:
    """Grey dilation by a (2r+1)-square, the picture's edge values extended."""
    if radius <= 0:
        return values
    padded = np.pad(values, radius, mode="edge")
    width = 2 * radius + 1
    return _window_max(_window_max(padded, width, 0), width, 1)


def stroke_width(mask: npt.NDArray[np.bool_]) -> float:
    """A stroke's typical width: twice the area over the perimeter (a stroke w × L: area wL,
    perimeter ~2L)."""
    area = float(mask.sum())
    edges = int(np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
                + np.count_nonzero(mask[0]) + np.count_nonzero(mask[-1])
                + np.count_nonzero(mask[:, 0]) + np.count_nonzero(mask[:, -1]))
    return 2 * area / max(edges, 1)


def normalise(ink: _F64, mask: npt.NDArray[np.bool_], shape: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """The digit (``ink`` 0..1, ``mask`` its pixels) fitted into ``shape`` as MNIST's were."""
    from PIL import Image

    rows, cols = shape
    where = np.argwhere(mask)
    (top, left), (bottom, right) = where.min(axis=0), where.max(axis=0) + 1
    crop = ink[top:bottom, left:right]
    box = max(1, round(min(rows, cols) * BOX))
    scale = box / max(crop.shape)
    width = stroke_width(mask[top:bottom, left:right])
    thinnest = THINNEST * box / scale  # MNIST's thinnest strokes, in the picture's pixels
    if width < thinnest:  # a pen's line on a large digit: thickened to MNIST's thinnest
        radius = int(np.ceil((thinnest - width) / 2))
        crop = _grow(np.pad(crop, radius), radius)
        scale = box / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    resized = Image.fromarray(crop.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS)
    digit = np.clip(np.asarray(resized, dtype=np.float64), 0, None)
    peak = float(digit.max())
    if peak <= 0:
        raise ImageError("the picture is blank (no ink stands out of the background); expected a "
                         "digit")
    digit = digit * (255.0 / peak)
    frame = np.zeros((rows, cols), dtype=np.float64)
    total = digit.sum()
    cy = float((digit.sum(axis=1) * np.arange(digit.shape[0])).sum() / total)
    cx = float((digit.sum(axis=0) * np.arange(digit.shape[1])).sum() / total)
    y0 = int(np.clip(round(rows / 2 - cy), 0, rows - digit.shape[0]))
    x0 = int(np.clip(round(cols / 2 - cx), 0, cols - digit.shape[1]))
    frame[y0 : y0 + digit.shape[0], x0 : x0 + digit.shape[1]] = digit
    return np.rint(np.clip(frame, 0, 255)).astype(np.uint8).reshape(rows * cols)


def preprocess(grey: _F64, shape: Sequence[int] = (28, 28)
               ) -> npt.NDArray[np.uint8]:
    """A grey picture (0..255, any size) as a flat uint8 vector of ``shape``'s pixels, white
    digit on black as MNIST's. ImageError when it holds no digit."""
    rows, cols = (int(d) for d in shape)
    contrast, noise = ink_contrast(grey)
    mask, _ = digit_mask(contrast, noise)
    # The digit with its soft edges (as MNIST's anti-aliased ones): pixels within 2 of a piece
    # kept that reach a fifth of the strokes' contrast; intensities relative to the strokes'.
    strong = float(np.percentile(contrast[mask], 90))
    kept = (_grow(mask.astype(np.float64), 2) > 0) & (contrast > EDGE * strong)
    ink = np.where(kept, np.clip(contrast / strong, 0.0, 1.0), 0.0)
    return normalise(ink, kept, (rows, cols))


def from_bytes(data: bytes, shape: Sequence[int] = (28, 28), **limits: int) -> npt.NDArray[np.uint8]:
    """The model's pixels (flat uint8, ``shape``) of a PNG or JPEG picture, within read_grey's
    ``limits``; ImageError saying what is wrong otherwise."""
    return preprocess(read_grey(data, **limits), shape)


def from_file(path: Path, shape: Sequence[int] = (28, 28), *, max_bytes: int = MAX_BYTES,
              **limits: int) -> npt.NDArray[np.uint8]:
    """As from_bytes, of a file; ImageError messages start with the path."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{size} bytes exceed the limit of {max_bytes} bytes per picture")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
    try:
        return from_bytes(data, shape, max_bytes=max_bytes, **limits)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None
