"""Decompression bombs within the pixel limit (4096×4096: kilobytes that would decode to hundreds of
megabytes), sent to a real ``python -m digitserve.server`` process with its defaults: each is
refused from its header with one exact line (more bytes decoded than --max-picture-decoded-bytes)
or decoded in bounded memory; the process's peak RSS grows by less than 150 MB over 16 of them in
a row and 16 at once (it grew by 780 MB for one on 8aac2c8); it answers the other pictures as
before."""

from __future__ import annotations

import io
import re
import signal
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw

from digitserve import pictures
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.support import digit_photo

SIDE = 4096
STROKE = [(0.15, 0.25), (0.3, 0.08), (0.6, 0.05), (0.82, 0.2), (0.8, 0.42), (0.5, 0.65),
          (0.15, 0.95), (0.9, 0.93)]
GROWTH_MB = 150  # the bound on the server's peak RSS over its RSS before the bombs


def ink(rows: int = SIDE) -> Image.Image:
    """A '2' as white strokes on black, SIDE pixels wide and ``rows`` tall."""
    image = Image.new("L", (SIDE, rows), 0)
    ImageDraw.Draw(image).line([(0.3 * SIDE + x * 0.4 * SIDE, 0.1 * rows + y * 0.8 * rows)
                                for x, y in STROKE], fill=255, width=rows // 14, joint="curve")
    return image


def png16(channels: int) -> bytes:
    """A SIDE×SIDE 16-bit PNG of zeros, grey (1 channel) or RGBA (4): Pillow writes neither."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = (b"\x00" + bytes(SIDE * channels * 2)) * SIDE
    header = struct.pack(">IIBBBBB", SIDE, SIDE, 16, {1: 0, 4: 6}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def saved(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def refused(kind: str, held: int, advice: str) -> str:
    return (f"INVALID_ARGUMENT: images[0].encoded: {SIDE}×{SIDE} pixels of {kind} decode to {held} "
            f"bytes, over the limit of 50331648 decoded bytes per picture; send fewer pixels or "
            f"{advice}")


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, str | None]]:
    """Each bomb's bytes and the server's exact answer: a refusal, or None for a digit decoded
    (its answer: that of the pixels preprocessed here)."""
    alpha = ink(3072)  # 4096×3072 RGBA: 48 MiB decoded, the limit itself
    black = Image.new("L", alpha.size, 0)
    return {
        # the issue's: 75 KB of transparent RGBA, 64 MiB decoded
        "rgba": (saved(Image.new("RGBA", (SIDE, SIDE), (255, 255, 255, 0)), optimize=True),
                 refused("8-bit RGBA", SIDE * SIDE * 4, "8 bits per sample")),
        "digit-rgba": (saved(Image.merge("RGBA", [black, black, black, alpha])), None),
        "rgba16": (png16(4), refused("16-bit RGBA", SIDE * SIDE * 8, "8 bits per sample")),
        "grey16": (saved(Image.fromarray((255 - np.asarray(ink(), np.uint16)) * 257)), None),
        "progressive-jpeg": (saved(Image.new("RGB", (SIDE, SIDE), "white"), "JPEG", quality=50,
                                   progressive=True, subsampling=0),
                             refused("progressive JPEG", 512 * 512 + 3 * 512 * 512 * 128,
                                     "a baseline (sequential) JPEG")),
    }


def peak_and_reset(pid: int) -> tuple[int, int]:
    """The process's VmRSS and VmHWM (peak) in MB; the peak is then reset to the RSS (Linux's
    clear_refs 5), so the next reading is the peak since."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", status))
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return int(found["VmRSS"]) // 1024, int(found["VmHWM"]) // 1024


def test_decompression_bombs_are_refused_or_decoded_in_bounded_memory(
    spawn: Any, tiny_repo: Path, bombs: dict[str, tuple[bytes, str | None]]
) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny")
    with grpc.insecure_channel(server.target()) as channel:
        stub = pb_grpc.DigitServiceStub(channel)

        def predict(image: pb.Image) -> pb.PredictResponse | str:
            try:
                return stub.Predict(pb.PredictRequest(model_name="tiny", images=[image]),
                                    timeout=120, wait_for_ready=True)
            except grpc.RpcError as error:
                return f"{error.code().name}: {error.details()}"

        def probabilities(answer: pb.PredictResponse | str) -> npt.NDArray[np.float32]:
            assert not isinstance(answer, str), answer
            return np.asarray(answer.predictions[0].probabilities, np.float32)

        def by_pixels(data: bytes) -> npt.NDArray[np.float32]:  # preprocessed here, sent as bytes
            return probabilities(predict(pb.Image(uint8=pictures.from_bytes(data).tobytes())))

        photos = [digit_photo("PNG"), digit_photo("JPEG", seed=1)]
        answers = [probabilities(predict(pb.Image(encoded=data))) for data in photos]
        for data, answer in zip(photos, answers, strict=True):
            np.testing.assert_allclose(answer, by_pixels(data), rtol=0, atol=1e-6)
        expected: dict[str, Callable[[Any], None]] = {}
        for name, (data, refusal) in bombs.items():
            if refusal is None:
                want = by_pixels(data)
                expected[name] = lambda answer, want=want: np.testing.assert_allclose(
                    probabilities(answer), want, rtol=0, atol=1e-6)
            else:
                expected[name] = lambda answer, refusal=refusal: _equal(answer, refusal)
        names = [list(bombs)[i % len(bombs)] for i in range(16)]
        before, _ = peak_and_reset(server.proc.pid)
        for name in names:  # in a row
            expected[name](predict(pb.Image(encoded=bombs[name][0])))
        _, peak = peak_and_reset(server.proc.pid)
        assert peak - before < GROWTH_MB, f"16 bombs in a row: RSS {before} MB, peak {peak} MB"
        with ThreadPoolExecutor(16) as pool:  # at once: --picture-threads (2) decode together
            at_once = list(pool.map(lambda name: predict(pb.Image(encoded=bombs[name][0])), names))
        for name, answer in zip(names, at_once, strict=True):
            expected[name](answer)
        _, peak = peak_and_reset(server.proc.pid)
        assert peak - before < GROWTH_MB, f"16 bombs at once: RSS {before} MB, peak {peak} MB"
        for data, answer in zip(photos, answers, strict=True):  # the same answers after them
            np.testing.assert_allclose(probabilities(predict(pb.Image(encoded=data))), answer,
                                       rtol=0, atol=1e-6)
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0, server.log


def _equal(answer: object, refusal: str) -> None:
    assert answer == refusal
