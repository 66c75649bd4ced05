"""digitserve.pictures: a picture of a digit becomes the pixels MNIST would have made of it, whatever
the photo did to it (lighting, polarity, noise, JPEG, placement, aspect, stroke width, dust, a
shadow), and every picture that cannot be used is one precise ImageError."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw

from digitserve import pictures
from digitserve.pictures import ImageError
from tests.support import assert_mnist_geometry

# Digits as pen strokes: polylines in a unit box (x right, y down).
STROKES = {
    "2": [(0.15, 0.25), (0.3, 0.08), (0.6, 0.05), (0.82, 0.2), (0.8, 0.42), (0.5, 0.65),
          (0.15, 0.95), (0.9, 0.93)],
    "4": [(0.65, 0.95), (0.65, 0.05), (0.1, 0.65), (0.92, 0.65)],
    "7": [(0.1, 0.08), (0.9, 0.08), (0.45, 0.95)],
}
Grey = npt.NDArray[np.float64]


def drawing(digit: str, size: tuple[int, int] = (400, 300),
            box: tuple[int, int, int, int] = (150, 40, 330, 260), width: int = 22) -> Grey:
    """Black ink on white paper, the digit's strokes filling ``box`` (x0, y0, x1, y1)."""
    image = Image.new("L", size, 255)
    x0, y0, x1, y1 = box
    points = [(x0 + x * (x1 - x0), y0 + y * (y1 - y0)) for x, y in STROKES[digit]]
    ImageDraw.Draw(image).line(points, fill=0, width=width, joint="curve")
    return np.asarray(image, dtype=np.float64)


def encode(grey: Grey, fmt: str = "PNG", mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert(mode).save(
        out, format=fmt, **({"quality": 70} if fmt == "JPEG" else {}))
    return out.getvalue()


def photographed(grey: Grey, seed: int = 0) -> Grey:
    """As the photo set draws it: paper lit by a linear gradient from 140 to 230, noise σ = 8."""
    rows, cols = grey.shape
    y, x = np.mgrid[0:rows, 0:cols]
    light = 140 + 90 * (0.7 * x / (cols - 1) + 0.3 * y / (rows - 1))
    return light * grey / 255 + np.random.default_rng(seed).normal(0, 8, grey.shape)


def distance(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> float:
    """Mean absolute difference of two 28×28 images, the better of shifts by up to one pixel."""
    x, y = a.reshape(28, 28).astype(np.float64), b.reshape(28, 28).astype(np.float64)
    return min(float(np.abs(np.roll(x, (dy, dx), axis=(0, 1)) - y).mean())
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def read(data: bytes, shape: tuple[int, int] = (28, 28)) -> npt.NDArray[np.uint8]:
    """pictures.from_bytes, its result checked against MNIST's geometry."""
    pixels = pictures.from_bytes(data, shape)
    assert_mnist_geometry(pixels, shape)
    return pixels


@pytest.fixture(scope="module", params=sorted(STROKES))
def digit(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def clean(digit: str) -> npt.NDArray[np.uint8]:
    """The pixels of the digit drawn cleanly: what every photo of it should come back as."""
    return read(encode(drawing(digit)))


def test_a_clean_drawing_is_normalised_as_mnist_s_digits(clean: npt.NDArray[np.uint8]) -> None:
    image = clean.reshape(28, 28).astype(np.float64)
    rows, cols = np.nonzero(image)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 in (20, 21)  # the 20×20 box, anti-aliased edges
    total = image.sum()
    centre = ((image.sum(axis=1) * np.arange(28)).sum() / total,
              (image.sum(axis=0) * np.arange(28)).sum() / total)
    assert np.allclose(centre, (14, 14), atol=0.5)  # MNIST's centre of mass, (14.0, 14.0) on average
    assert clean.max() == 255 and image[:, :2].max() == 0 and image[:, -2:].max() == 0


def test_an_mnist_image_comes_back_as_it_is(clean: npt.NDArray[np.uint8]) -> None:
    again = read(encode(clean.reshape(28, 28).astype(np.float64)))
    assert np.abs(again.astype(np.int64) - clean).mean() < 3


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_photo_on_a_lighting_gradient_with_noise_gives_the_clean_pixels(
    digit: str, clean: npt.NDArray[np.uint8], fmt: str
) -> None:
    """The issue's failure: the old preprocessing took the gradient for ink (a '3' read as 4 and 9)."""
    photo = read(encode(photographed(drawing(digit)), fmt, "RGB"))
    assert distance(photo, clean) < 2


def test_light_ink_on_dark_paper_gives_the_same_pixels(digit: str, clean: npt.NDArray[np.uint8]) -> None:
    assert distance(read(encode(255 - photographed(drawing(digit)))), clean) < 2


def test_an_off_centre_digit_on_a_long_picture_gives_the_same_pixels(
    digit: str, clean: npt.NDArray[np.uint8]
) -> None:
    # The same digit (same aspect ratio, 130×159 px) at the right end of a 640×200 picture.
    far = drawing(digit, size=(640, 200), box=(490, 20, 620, 179), width=16)
    assert distance(read(encode(photographed(far))), clean) < 4


def test_a_pen_s_thin_line_is_thickened_as_mnist_s_strokes(
    digit: str, clean: npt.NDArray[np.uint8], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Strokes of 1 % of the digit's height instead of 10 %: scaled down as they are, a faint line
    # of a third of the ink (measured: 0.33-0.38 of the clean drawing's); thickened, most of it.
    data = encode(drawing(digit, size=(600, 640), box=(110, 20, 490, 610), width=6))
    assert read(data).sum() > 0.7 * clean.sum()
    monkeypatch.setattr(pictures, "THINNEST", 0.0)
    assert read(data).sum() < 0.5 * clean.sum()


def test_dust_and_specks_are_not_part_of_the_digit(digit: str, clean: npt.NDArray[np.uint8]) -> None:
    dusty = drawing(digit)
    for y, x in ((10, 10), (280, 20), (150, 60), (20, 380), (290, 390)):
        dusty[y : y + 3, x : x + 3] = 0
    assert distance(read(encode(dusty)), clean) < 1


def test_a_shadow_s_edge_is_not_taken_for_ink(digit: str, clean: npt.NDArray[np.uint8]) -> None:
    shadowed = photographed(drawing(digit))
    shadowed[:, :110] *= 0.55  # the left third in the shade: a step no smooth surface follows
    assert distance(read(encode(shadowed)), clean) < 4


def test_transparent_16_bit_and_palette_pictures_give_the_same_pixels(
    digit: str, clean: npt.NDArray[np.uint8]
) -> None:
    ink = (255 - drawing(digit)).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([np.zeros_like(ink)] * 3 + [ink]), "RGBA")  # ink on nothing
    sixteen = Image.fromarray(drawing(digit).astype(np.uint16) * 257)
    palette = Image.fromarray(drawing(digit).astype(np.uint8)).convert("P")
    for image in (rgba, sixteen, palette):
        out = io.BytesIO()
        image.save(out, format="PNG")
        assert distance(read(out.getvalue()), clean) < 1, image.mode


def test_a_twelve_megapixel_jpeg_is_decoded_reduced(digit: str, clean: npt.NDArray[np.uint8]) -> None:
    big = Image.fromarray(drawing(digit).astype(np.uint8)).resize((4000, 3000))
    grey = pictures.read_grey(encode(np.asarray(big, dtype=np.float64), "JPEG"))
    assert max(grey.shape) <= pictures.WORK_SIDE
    pixels = pictures.preprocess(grey)
    assert_mnist_geometry(pixels)
    assert distance(pixels, clean) < 2


def test_the_same_bytes_give_the_same_pixels() -> None:
    data = encode(photographed(drawing("2"), seed=3), "JPEG", "RGB")
    np.testing.assert_array_equal(read(data), read(data))


def test_another_input_shape_gets_its_frame() -> None:
    pixels = read(encode(drawing("7")), (14, 14))
    assert pixels.shape == (196,) and pixels.max() == 255


def png_header(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG that declares ``width``×``height`` pixels of ``depth`` bits and colour type
    ``colour`` (0 grey, 2 RGB, 3 palette, 4 grey and alpha, 6 RGBA) and holds a few kilobytes: a
    decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(4096)))
            + chunk(b"IEND", b""))


GIF = encode(drawing("7"), "GIF")


def jpeg_header(width: int, height: int, progressive: bool, first_scan: int | None = None,
                subsampling: int = 0) -> bytes:
    """A 64×64 RGB JPEG (4:4:4, or Pillow's ``subsampling``) whose frame header says
    ``width``×``height``: a bomb's header; ``first_scan`` rewrites the number of components its
    first scan says it holds."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, "JPEG", progressive=progressive,
                                                  subsampling=subsampling)
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    if first_scan is not None:
        data[data.index(b"\xff\xda") + 4] = first_scan
    return bytes(data)


DECODED = "decoded bytes per picture"
BLANK = "the picture is blank (no ink stands out of the background); expected a digit"


def past_the_header(data: bytes, max_decoded_bytes: int | None = None) -> bool:
    """Whether from_bytes (with ``max_decoded_bytes``, else its default) gets past the header's
    checks: its answer is pixels, or an error from decoding the picture (a bomb's header holds
    little of one: its data is truncated, blank, or what libjpeg makes of the rest)."""
    limits = {} if max_decoded_bytes is None else {"max_decoded_bytes": max_decoded_bytes}
    try:
        pictures.from_bytes(data, **limits)
    except ImageError as error:
        return str(error).startswith("corrupt or truncated ") or str(error) == BLANK
    return True


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty; expected the bytes of a PNG, JPEG or WebP picture"),
    (bytes(9000), "9000 bytes exceed the limit of 8192 bytes per picture"),
    (GIF, f"not a PNG, JPEG or WebP image (it starts with {GIF[:8]!r})"),
    (b"hello, world", "not a PNG, JPEG or WebP image (it starts with b'hello, w')"),
    (png_header(5000, 4000), "5000×4000 pixels exceed the limit of 16777216 pixels per picture"),
    (png_header(100_000, 100_000),  # beyond Pillow's own bound: refused by Pillow, said as ours
     "10000000000 pixels exceed the limit of 16777216 pixels per picture"),
    (png_header(4096, 4096, 16, 6),  # a few kilobytes that would inflate to 128 MiB
     f"4096×4096 pixels of 16-bit RGBA decode to 134217728 bytes, over the limit of 50331648 "
     f"{DECODED}; send fewer pixels or 8 bits per sample"),
    (png_header(4096, 4096, 8, 6),  # the bomb: 75 KB of transparent RGBA
     f"4096×4096 pixels of 8-bit RGBA decode to 67108864 bytes, over the limit of 50331648 "
     f"{DECODED}; send fewer pixels or 8 bits per sample"),
    (png_header(4096, 3000, 16, 2),  # 6 bytes a pixel inflated, 4 held
     f"4096×3000 pixels of 16-bit RGB decode to 73728000 bytes, over the limit of 50331648 "
     f"{DECODED}; send fewer pixels or 8 bits per sample"),
    (jpeg_header(4096, 4096, progressive=True),  # libjpeg holds every DCT coefficient
     f"4096×4096 pixels of progressive JPEG decode to 100925440 bytes, over the limit of 50331648 "
     f"{DECODED}; send fewer pixels or a baseline (sequential) JPEG"),
    (jpeg_header(4096, 4096, progressive=False, first_scan=1),  # one component per scan: buffered
     f"4096×4096 pixels of multi-scan JPEG decode to 100925440 bytes, over the limit of 50331648 "
     f"{DECODED}; send fewer pixels or a baseline (sequential) JPEG"),
    (encode(np.full((50, 60), 200.0)),
     "the picture is blank (no ink stands out of the background); expected a digit"),
    (encode(np.random.default_rng(1).normal(180, 8, (200, 200))),
     "the picture is blank (no ink stands out of the background); expected a digit"),
    (encode(np.full((1, 1), 3.0)),
     "the picture is blank (no ink stands out of the background); expected a digit"),
], ids=["empty", "too-many-bytes", "gif", "text", "too-many-pixels", "bomb", "rgba16-bomb",
        "rgba-bomb", "rgb16-bomb", "progressive-jpeg-bomb", "multi-scan-jpeg-bomb",
        "uniform", "noise", "one-pixel"])
def test_pictures_that_cannot_be_used_are_one_line(data: bytes, message: str) -> None:
    with pytest.raises(ImageError) as info:
        pictures.from_bytes(data, max_bytes=8192 if len(data) == 9000 else pictures.MAX_BYTES)
    assert str(info.value) == message


@pytest.mark.parametrize("data", [
    png_header(4096, 3072, 8, 6),  # 48 MiB of RGBA: the limit itself
    png_header(4096, 4096, 16, 0),  # 16-bit grey: 2 bytes a pixel
    png_header(4096, 4096, 8, 3),  # a palette: 1 byte a pixel
    jpeg_header(4096, 4096, progressive=False),  # baseline: decoded at 1/8, 512×512 grey
    jpeg_header(4032, 3024, progressive=True, subsampling=2),  # a 12-megapixel 4:2:0 photo
], ids=["rgba-4096x3072", "grey16-4096", "palette-4096", "baseline-jpeg-4096", "progressive-jpeg-12mp"])
def test_a_header_within_the_decoded_bytes_is_decoded(data: bytes) -> None:
    """The headers of big pictures that hold no more than the limit are not refused by it: their
    few bytes of data are decoded (truncated, or blank)."""
    assert past_the_header(data)


@pytest.mark.parametrize(("data", "kind", "held"), [
    (png_header(1000, 1000, 1, 0), "1-bit grey", 1_000_000),  # Pillow: a byte a pixel
    (png_header(1000, 1000, 8, 3), "8-bit palette", 1_000_000),
    (png_header(1000, 1000, 16, 0), "16-bit grey", 2_000_000),
    (png_header(1000, 1000, 8, 4), "8-bit grey and alpha", 4_000_000),  # Pillow: 4, not 2
    (png_header(1000, 1000, 8, 2), "8-bit RGB", 4_000_000),  # Pillow: 4, not 3
    (png_header(1000, 1000, 16, 2), "16-bit RGB", 6_000_000),  # inflated: 6, held: 4
    (png_header(1000, 1000, 16, 6), "16-bit RGBA", 8_000_000),
    # decoded at 1/2 (500×500 grey) + 3 components of 125×125 blocks of 64 int16 coefficients
    (jpeg_header(1000, 1000, progressive=True), "progressive JPEG", 250_000 + 3 * 125 * 125 * 128),
    (jpeg_header(1000, 1000, progressive=True, subsampling=2), "progressive JPEG",  # 4:2:0
     250_000 + 125 * 125 * 128 + 2 * 63 * 63 * 128),
    (jpeg_header(4096, 4096, progressive=False), "JPEG", 512 * 512),  # decoded at 1/8, grey
], ids=["1-bit", "palette", "grey16", "grey-alpha", "rgb", "rgb16", "rgba16", "progressive",
        "progressive-420", "baseline"])
def test_the_decoded_bytes_are_counted_from_the_header(data: bytes, kind: str, held: int) -> None:
    """One byte under what a picture decodes to, it is refused with that count; at it, it is not
    refused by it (its few bytes of data are decoded: truncated, or blank)."""
    advice = ("fewer pixels or 8 bits per sample" if "bit" in kind else "fewer pixels" if
              kind == "JPEG" else "fewer pixels or a baseline (sequential) JPEG")
    size = "4096×4096" if kind == "JPEG" else "1000×1000"
    with pytest.raises(ImageError) as info:
        pictures.from_bytes(data, max_decoded_bytes=held - 1)
    assert str(info.value) == (f"{size} pixels of {kind} decode to {held} bytes, over the limit "
                               f"of {held - 1} {DECODED}; send {advice}")
    assert past_the_header(data, held)


def oracle_grey(image: Image.Image, side: int = pictures.WORK_SIDE) -> Grey:
    """read_grey by its definition on the whole picture at once: alpha composed onto white when
    the opaque pixels (alpha > half) are dark on average, else onto black; 16 bits scaled to 8;
    then area averages of factor×factor boxes (Pillow's reduce, float32)."""
    if image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    else:
        la = np.asarray(image.convert("LA"), dtype=np.float64)
        alpha = la[..., 1] / 255.0
        opaque = alpha > 0.5
        background = 255.0 if not opaque.any() or la[..., 0][opaque].mean() < 128 else 0.0
        grey = la[..., 0] * alpha + background * (1 - alpha)
    factor = -(-max(image.size) // side)
    reduced = Image.fromarray(grey.astype(np.float32), mode="F").reduce(factor)
    return np.asarray(reduced, dtype=np.float64)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16"])
def test_alpha_and_16_bits_are_turned_grey_by_bands_as_a_whole(mode: str) -> None:
    """A picture with alpha or 16 bits is turned grey band by band (its float64 arrays stay a few
    megabytes); the result is the whole picture's, bit for bit: 2001×1703 pixels reduce by 7, in
    bands of 28 rows and a last one of 23, with colours under the transparent pixels and the ink
    light on dark, so that the background's choice is the whole picture's."""
    rng = np.random.default_rng(5)
    ink = np.asarray(Image.fromarray(drawing("4", (2001, 1703), (700, 300, 1300, 1400), 120)))
    alpha = (255 - ink).astype(np.uint8)
    colour = rng.integers(150, 256, ink.shape, dtype=np.uint8)  # light ink, noise where transparent
    image: Image.Image
    if mode == "I;16":
        noise = rng.integers(0, 257, ink.shape, dtype=np.uint16)
        image = Image.fromarray(ink.astype(np.uint16) * 257 + noise)
    elif mode == "P":
        image = Image.fromarray(ink.astype(np.uint8)).convert("P")
        image.info["transparency"] = 255
    else:
        bands = [colour] * (3 if mode == "RGBA" else 1) + [alpha]
        image = Image.fromarray(np.dstack(bands), mode)
    out = io.BytesIO()
    image.save(out, "PNG", **({"transparency": 255} if mode == "P" else {}))
    data = out.getvalue()
    expected = oracle_grey(Image.open(io.BytesIO(data)))
    assert expected.shape == (244, 286)
    np.testing.assert_array_equal(pictures.read_grey(data), expected)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_picture_is_one_line(fmt: str) -> None:
    data = encode(photographed(drawing("4")), fmt)
    with pytest.raises(ImageError) as info:
        pictures.from_bytes(data[: len(data) // 3])
    assert re.fullmatch(r"corrupt or truncated (PNG|JPEG) data \([^\n]+\)|not a readable PNG, JPEG or "
                        r"WebP image \([^\n]+\)", str(info.value)), info.value
    assert " at 0x" not in str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        pictures.from_file(tmp_path / "none.png")
    assert str(info.value) == f"{tmp_path / 'none.png'}: cannot be read (No such file or directory)"
    (tmp_path / "big.png").write_bytes(bytes(2048))
    with pytest.raises(ImageError) as info:
        pictures.from_file(tmp_path / "big.png", max_bytes=1024)
    assert str(info.value) == f"{tmp_path / 'big.png'}: 2048 bytes exceed the limit of 1024 bytes per picture"
