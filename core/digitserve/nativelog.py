"""Lines native libraries write straight to file descriptor 2, made log records.

LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` when an interpreter first
allocates; grpc core and TensorFlow write absl lines (``E0000 00:00:1795916047.597076    9767
tcp_server_posix.cc:220] File descriptor limit reached. Retrying.``). :func:`native_record` reads
one such line; :func:`native_stderr_logged` turns the lines written while a block runs into
records of a logger. Standard library only: both the inference package (which loads LiteRT) and
the server's logging (``digitserve.server.logs``, whose stderr bridge uses :func:`native_record`)
import it, so neither imports the other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# TensorFlow Lite's ("INFO: ...") and absl's (the format of grpc core and TensorFlow) lines.
_NATIVE_LINE = re.compile(rb"(VERBOSE|INFO|WARNING|ERROR): (.*)")
_NATIVE_LEVELS = {b"VERBOSE": logging.DEBUG, b"INFO": logging.DEBUG, b"WARNING": logging.WARNING,
                  b"ERROR": logging.ERROR}
_ABSL_LINE = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ ([^\]\s]+:\d+)\] ?(.*)")
_ABSL_LEVELS = {b"I": logging.INFO, b"W": logging.WARNING, b"E": logging.ERROR, b"F": logging.CRITICAL}
MAX_NATIVE_CHARS = 2000  # a native line longer than this is cut (its length said)


def native_record(line: bytes) -> tuple[int, str, str | None] | None:
    """(level, message, source) of one line in a native library's format (LiteRT's or absl's;
    LiteRT's INFO is DEBUG here), or None for any other line. ``source`` is absl's ``file:line``."""
    line = line.rstrip(b"\r\n")
    if (absl := _ABSL_LINE.fullmatch(line)) is not None:
        level, source, message = _ABSL_LEVELS[absl.group(1)], absl.group(2).decode(errors="replace"), \
            absl.group(3)
    elif (lite := _NATIVE_LINE.fullmatch(line)) is not None:
        level, source, message = _NATIVE_LEVELS[lite.group(1)], None, lite.group(2)
    else:
        return None
    return level, shorten(message.decode("utf-8", "replace"), MAX_NATIVE_CHARS), source


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, its full length said when it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


@contextlib.contextmanager
def native_stderr_logged(logger: logging.Logger) -> Iterator[None]:
    """Turns the lines a native library writes to file descriptor 2 while the block runs (LiteRT's
    delegate notice, when an interpreter first allocates its tensors) into records of ``logger``,
    so that a stream of JSON lines stays JSON; its INFO lines become DEBUG records. Anything else
    written to stderr meanwhile (another thread's log lines) is written back unchanged after the
    block. Without a file descriptor 2 to redirect, the block runs as it is."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as capture:  # a file, not a pipe: writers never block on it
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        other = []
        for line in capture.read().splitlines(keepends=True):
            native = native_record(line)
            if native is None:
                other.append(line)
            else:
                logger.log(native[0], "%s", native[1])
        if other:
            with contextlib.suppress(OSError):
                os.write(2, b"".join(other))
