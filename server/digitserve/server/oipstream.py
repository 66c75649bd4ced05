"""Triton's ModelStreamInfer over the V2 protocol's gRPC binding: each ModelInferRequest of a
bidirectional stream answered as ModelInfer would answer it, in a ModelStreamInferResponse
carrying the response or, for a request refused, its one-line error message (and its id), without
ending the stream. Up to STREAM_WINDOW requests of a stream are computed at once (so they batch
with one another and with other calls); their answers go out as they are ready, which may differ
from the order of the requests. The stream ends once the client half-closes and every request
read is answered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server import oipcodec
from digitserve.server.decoding import PictureDecoder
from digitserve.server.drain import REFUSED
from digitserve.server.errors import ServerError
from digitserve.server.registry import Registry
from digitserve.server.status import INTERNAL_MESSAGE, Undecodable

logger = logging.getLogger(__name__)

STREAM_WINDOW = 64
"""Requests of one stream read and not yet answered (computing, or their answers waiting to be
sent); while that many are, the stream's next request is not read (HTTP/2's flow control then
holds the client back), so a client that sends without reading answers holds no more than that.
Each one's images still wait in the model's bounded queue like any call's (--max-queued-images)."""

_END = oip.ModelStreamInferResponse()  # the reader's mark: every request read has been answered


async def _answer(router: Registry, pictures: PictureDecoder, message: oip.ModelInferRequest | Undecodable,
                  until: float | None) -> oip.ModelStreamInferResponse:
    """``message``'s answer, or its error as ModelInfer's status message would say it."""
    if isinstance(message, Undecodable):
        return oip.ModelStreamInferResponse(error_message=str(message.error("request")))
    try:
        return oip.ModelStreamInferResponse(
            infer_response=await oipcodec.model_infer(router, pictures, message, until))
    except ServerError as exc:
        error = str(exc)
    except Exception:
        logger.exception("unexpected error in ModelStreamInfer")
        error = INTERNAL_MESSAGE
    return oip.ModelStreamInferResponse(error_message=error, infer_response=oip.ModelInferResponse(
        model_name=message.model_name, model_version=message.model_version, id=message.id))


def _refused(message: oip.ModelInferRequest | Undecodable) -> oip.ModelStreamInferResponse:
    """The answer of a request that came during the drain."""
    if isinstance(message, Undecodable):
        return oip.ModelStreamInferResponse(error_message=REFUSED)
    return oip.ModelStreamInferResponse(error_message=REFUSED, infer_response=oip.ModelInferResponse(
        model_name=message.model_name, model_version=message.model_version, id=message.id))


async def model_stream_infer(
    router: Registry, pictures: PictureDecoder,
    requests: AsyncIterator[oip.ModelInferRequest | Undecodable], until: float | None,
    draining: Callable[[], bool] = lambda: False,
) -> AsyncIterator[oip.ModelStreamInferResponse]:
    """The answers of the stream's requests, as each is ready (until: the call's deadline). Once
    the server drains, a request that comes is not run: it is answered the drain's UNAVAILABLE
    message (retry elsewhere), as a call that arrives then is; those read before finish."""
    answers: asyncio.Queue[oip.ModelStreamInferResponse | Exception] = asyncio.Queue()
    window = asyncio.Semaphore(STREAM_WINDOW)
    running: set[asyncio.Task[None]] = set()

    async def answer(message: oip.ModelInferRequest | Undecodable) -> None:
        answers.put_nowait(await _answer(router, pictures, message, until))

    async def read() -> None:
        try:
            async for message in requests:
                await window.acquire()  # released once its answer is sent
                if draining():
                    answers.put_nowait(_refused(message))
                    continue
                task = asyncio.ensure_future(answer(message))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:  # half-closed: the requests read are answered, then the stream ends
                await asyncio.wait(set(running))
        except Exception as exc:  # the request stream broke: the call ends with its error
            answers.put_nowait(exc)
        answers.put_nowait(_END)

    reader = asyncio.ensure_future(read())
    try:
        while (response := await answers.get()) is not _END:
            if isinstance(response, Exception):
                raise response
            yield response  # returns once grpc sent it: a client that does not read holds the window
            window.release()
    finally:  # ended, or abandoned by the client (cancelled): nothing of it goes on running
        reader.cancel()
        for task in list(running):
            task.cancel()
