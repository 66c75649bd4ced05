"""The threads that decode pictures (``Image.encoded``, V2 BYTES inputs) off the event loop, and the
limits a request's pictures keep. Measured (``python -m bench.photoset cost``,
docs/interoperability.md): a 200–640 px photo costs milliseconds of CPU, over the event loop's
rule of about a millisecond (ARCHITECTURE.md), so pictures never run on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from digitserve import pictures
from digitserve.server.errors import OverloadedError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PictureLimits:
    """What one request's pictures may be: how many, bytes per picture and per request, pixels and
    decoded bytes per picture (from its header: a decoding thread holds ``max_decoded_bytes``)."""

    max_bytes: int = pictures.MAX_BYTES
    max_request_bytes: int = 16 * 1024 * 1024
    max_pixels: int = pictures.MAX_PIXELS
    max_pictures: int = 64
    max_decoded_bytes: int = pictures.MAX_DECODED_BYTES


class PictureDecoder:
    """Decodes pictures on ``threads`` threads of its own, shared by every model. At most
    ``limits.max_pictures`` wait or are being decoded; a call beyond is refused at once
    (OverloadedError). Decoded pictures hold about ``threads`` × ``max_decoded_bytes`` at most."""

    def __init__(self, threads: int = 2, limits: PictureLimits | None = None) -> None:
        self.limits = limits or PictureLimits()
        self.max_queued, self.queued = self.limits.max_pictures, 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pictures")

    def admit(self, count: int) -> None:
        """OverloadedError when ``count`` more pictures would not fit."""
        if self.queued + count > self.max_queued:
            raise OverloadedError(f"server overloaded: {self.queued} pictures are waiting to be decoded, "
                                  f"limit {self.max_queued}; retry with backoff")

    async def run(self, count: int, work: Callable[[], T]) -> T:
        """``work()`` (decoding ``count`` pictures) on the decoder's threads, admitted first; they
        count as queued until it finished, even when the caller went away before."""
        self.admit(count)
        self.queued += count
        loop = asyncio.get_running_loop()

        def release(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
                loop.call_soon_threadsafe(self._release, count)

        try:
            future = self._executor.submit(work)
        except RuntimeError:  # shut down
            self.queued -= count
            raise OverloadedError("server stopped before decoding the pictures") from None
        future.add_done_callback(release)
        return await asyncio.wrap_future(future)

    def _release(self, count: int) -> None:
        self.queued -= count

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
