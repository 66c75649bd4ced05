"""The event loop a server process runs on (``--event-loop``): uvloop (libuv's loop, in C) or the
standard library's asyncio loop. The server's work is grpc.aio's and aiohttp's callbacks on that
loop, so the loop's own overhead is a share of every call: uvloop takes it from Python into C.
Pinned to one core as ``bench.versus`` pins each server, uvloop took 6 % less CPU per 1-image V2
call than asyncio's loop (636 → 604 µs, 1.07× the calls a second) and 7 % less per 64-image call
(1,368 → 1,322 µs, 1.08×), medians of 6 alternating rounds (``python -m bench.variants --edge
v2-grpc --shape 1x64 --variant "asyncio=--event-loop asyncio" --variant "uvloop=--event-loop
uvloop"``, and ``--shape 64x8``; BENCHMARKS.md), and 21 % fewer instructions per 1-image V2 call
under callgrind (951,540 → 755,259: ``python -m bench.instructions --edge v2-grpc --shape 1x64``,
with and without ``--server-arg=--event-loop --server-arg=asyncio``). Both loops run the same
code; the tests run the server on its default, and ``tests/server/test_event_loop.py`` runs the
same calls on both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from importlib import import_module
from typing import Any, TypeVar

__all__ = ["EventLoopError", "chosen", "describe", "factory", "run"]

T = TypeVar("T")


class EventLoopError(RuntimeError):
    """--event-loop uvloop where uvloop cannot be imported."""


def chosen(choice: str) -> str:
    """'uvloop' or 'asyncio' for a --event-loop value: 'auto' is uvloop when it imports."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import_module("uvloop")
    except ImportError as error:
        if choice == "uvloop":
            raise EventLoopError(
                f"--event-loop uvloop: uvloop cannot be imported ({error}); install it (pip install "
                f"'uvloop>=0.21'), or serve with --event-loop asyncio") from None
        return "asyncio"
    return "uvloop"


def factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new loop of the kind a --event-loop value names."""
    if chosen(choice) == "uvloop":
        uvloop = import_module("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names (asyncio.run is this Runner too)."""
    with asyncio.Runner(loop_factory=factory(choice)) as runner:
        return runner.run(main)


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """The running loop as the start-up line names it: 'uvloop 0.23.0' or 'asyncio'."""
    module = type(loop).__module__.split(".")[0]
    if module == "uvloop":
        return f"uvloop {import_module('uvloop').__version__}"
    return "asyncio"
