"""Pictures phones make: WebP read as PNG and JPEG are (encoded here by Pillow), HEIC through the
optional pillow-heif (the heic extra) or refused with a line naming it, and a picture over the
size limit refused with the project's own line on both preprocess paths (``--preprocess server``
checks before sending, as the default path does before decoding)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw

from digitserve import pictures
from digitserve.client.cli import main
from digitserve.client.client import DigitClient
from digitserve.client.images import ImageError as ClientImageError
from digitserve.pictures import ImageError
from tests.servers import ServerThread

LIMIT = pictures.MAX_BYTES
HEIC_LINE = ("a HEIC (HEIF) picture, which needs the heic extra: pip install 'digitserve[heic]' "
             "(pillow-heif); or convert it to JPEG or PNG")


def seven(size: int = 280) -> Image.Image:
    """A hand-drawn-like 7: dark ink on light paper, in colour (as a phone photo is)."""
    picture = Image.new("RGB", (size, size), (235, 232, 225))
    draw = ImageDraw.Draw(picture)
    s = size / 28
    draw.line([(6 * s, 6 * s), (21 * s, 6 * s), (11 * s, 23 * s)], fill=(20, 20, 30), width=int(2.5 * s))
    return picture


def encoded(picture: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    picture.save(out, format=fmt, **options)
    return out.getvalue()


def test_webp_lossless_reads_as_the_same_picture_in_png() -> None:
    picture = seven()
    webp = encoded(picture, "WEBP", lossless=True)
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP"
    np.testing.assert_array_equal(pictures.from_bytes(webp), pictures.from_bytes(encoded(picture, "PNG")))


def test_webp_lossy_and_with_alpha_are_read() -> None:
    lossy = pictures.from_bytes(encoded(seven(), "WEBP", quality=80))
    png = pictures.from_bytes(encoded(seven(), "PNG")).astype(int)
    assert np.abs(lossy.astype(int) - png).mean() < 8  # lossy: close, not equal
    clear = seven().convert("RGBA")
    clear.putalpha(Image.new("L", clear.size, 255))
    np.testing.assert_array_equal(pictures.from_bytes(encoded(clear, "WEBP", lossless=True)),
                                  pictures.from_bytes(encoded(clear, "PNG")))


def test_a_webp_over_the_pixel_limit_is_refused_from_its_header() -> None:
    webp = encoded(Image.new("L", (300, 300), 255), "WEBP", lossless=True)
    with pytest.raises(ImageError) as info:
        pictures.from_bytes(webp, max_pixels=200 * 200)
    assert str(info.value) == "300×300 pixels exceed the limit of 40000 pixels per picture"


def heic_header() -> bytes:
    """The start of a HEIC file as phones (and pillow-heif) write it: the ISO base media ftyp box."""
    return b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heicmiaf" + b"\x00\x00\x01\x00meta" + bytes(200)


def test_heic_without_the_extra_is_refused_with_a_line_naming_it(
    tiny_server: ServerThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(pictures, "_heif", [False])  # as where pillow-heif is not installed
    with pytest.raises(ImageError) as info:
        pictures.from_bytes(heic_header())
    assert str(info.value) == HEIC_LINE
    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(heic_header())
    assert main(["--target", tiny_server.target, "predict", "--image", str(photo)]) == 1
    assert capsys.readouterr().err == f"mnist-client: error: {photo}: {HEIC_LINE}\n"
    # The server refuses it alike (the client's typed errors are another item's: any type here).
    with DigitClient(tiny_server.target, timeout=30) as client, pytest.raises(Exception) as refused:
        client.predict(heic_header(), preprocess="server")
    assert str(refused.value).endswith(f"images[0].encoded: {HEIC_LINE}"), refused.value


def test_heic_with_the_extra_is_read() -> None:
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heic extra (pillow-heif) is not installed")
    assert pictures._formats()[-1] == "HEIF"
    heic = encoded(seven(), "HEIF", quality=90)
    assert heic[4:12] == b"ftypheic", pillow_heif.__version__
    pixels = pictures.from_bytes(heic).astype(int)
    assert np.abs(pixels - pictures.from_bytes(encoded(seven(), "PNG")).astype(int)).mean() < 8


def big_png(path: Path, over: int) -> int:
    """A PNG of noise (incompressible) a little over ``over`` bytes; its size."""
    side = int((over / 3) ** 0.5) + 40
    noise: npt.NDArray[np.uint8] = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
    Image.fromarray(noise).save(path, format="PNG", compress_level=1)
    size = path.stat().st_size
    assert size > over
    return size


def test_a_27_mb_png_gets_the_same_line_on_both_preprocess_paths(
    tiny_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "huge.png"
    size = big_png(photo, 27_000_000)
    line = f"mnist-client: error: {photo}: {size} bytes exceed the limit of {LIMIT} bytes per picture\n"
    for preprocess in ("client", "server"):
        assert main(["--target", tiny_server.target, "predict", "--image", str(photo),
                     "--preprocess", preprocess]) == 1
        assert capsys.readouterr().err == line, preprocess
    with DigitClient(tiny_server.target, timeout=30) as client:
        for preprocess in ("client", "server"):
            with pytest.raises(ClientImageError) as info:
                client.predict(photo.read_bytes(), preprocess=preprocess)  # type: ignore[arg-type]
            assert str(info.value) == f"{size} bytes exceed the limit of {LIMIT} bytes per picture"


def test_pictures_over_the_request_limit_together_are_refused_before_sending(
    tiny_server: ServerThread, tmp_path: Path
) -> None:
    photo = tmp_path / "big.png"
    size = big_png(photo, 6_000_000)
    with DigitClient(tiny_server.target, timeout=30) as client, pytest.raises(ClientImageError) as info:
        client.predict([photo] * 3, preprocess="server")
    limit = 16 * 1024 * 1024 - 64 * 1024
    assert str(info.value) == (
        f"3 pictures of {3 * size} bytes exceed the limit of {limit} bytes of pictures per request; "
        "send fewer per call, or preprocess them here (preprocess='client')")


def test_webp_through_the_server_answers_as_through_the_client(tiny_server: ServerThread) -> None:
    webp = encoded(seven(), "WEBP", lossless=True)
    with DigitClient(tiny_server.target, timeout=30) as client:
        here = client.predict(webp)
        there = client.predict(webp, preprocess="server")
    np.testing.assert_allclose(there.probabilities, here.probabilities, atol=1e-6)
