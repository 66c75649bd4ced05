"""Log formats for the server: JSON lines for machines, one readable line for people, and the
request id of the call being served (a context variable the formatters add to every record)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("auto", "json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Set by the telemetry interceptor for the duration of one call (one asyncio task).
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id`` when the record was made while serving a call, the fields passed as
    ``extra=``, and ``exception`` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def text_formatter() -> logging.Formatter:
    """``2026-01-01 12:00:00,123 INFO server.app listening on 127.0.0.1:50051 (model mnist)``."""
    return logging.Formatter(TEXT_FORMAT)


def resolve_format(log_format: str, is_terminal: bool) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal and JSON anywhere else."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    if log_format == "auto":
        return "text" if is_terminal else "json"
    return log_format


access_logger = logging.getLogger("server.access")
_PLAIN = re.compile(r"[A-Za-z0-9._:/+=\[\]-]*")  # needs no JSON escaping (peers, request ids)


class AccessLog:
    """One line per call (method, status code, latency, peer, request id) on the ``server.access``
    logger; off below INFO.

    By default each line is a logging record. ``direct()`` (the mnist-serve process) formats the
    lines itself, exactly as the configured handler would, and writes them in batches: a call then
    costs a tuple appended to a list instead of a logging record, a formatter and a write (a tenth
    of a Predict's CPU). Lines are written at most ``flush_interval`` seconds after their call,
    like nginx's ``access_log ... buffer= flush=``; App.stop() writes what is left."""

    def __init__(self) -> None:
        self._stream: TextIO | None = None
        self._json = True
        self.flush_interval = 0.25
        self.max_buffered = 2048
        self._buffer: list[tuple[float, str, str, float, str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""

    def direct(self, stream: TextIO, json_lines: bool) -> None:
        self._stream = stream
        self._json = json_lines

    @staticmethod
    def enabled() -> bool:
        return access_logger.isEnabledFor(logging.INFO)

    def write(self, method: str, code: str, latency_ms: float, peer: str, request_id: str) -> None:
        if self._stream is None:
            access_logger.info(
                "%s %s %.2f ms peer=%s request_id=%s", method, code, latency_ms, peer, request_id,
                extra={"method": method, "code": code, "latency_ms": latency_ms, "peer": peer,
                       "request_id": request_id},
            )
            return
        self._buffer.append((time.time(), method, code, latency_ms, peer, request_id))
        if len(self._buffer) >= self.max_buffered:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self.flush)
            except RuntimeError:  # no event loop: write at once
                self.flush()

    def _time(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            stamp = datetime.fromtimestamp(second, UTC)
            self._second_text = (
                stamp.strftime("%Y-%m-%dT%H:%M:%S") if self._json else stamp.astimezone().strftime(
                    "%Y-%m-%d %H:%M:%S")
            )
        millis = int((when - second) * 1000)
        return f"{self._second_text}.{millis:03d}Z" if self._json else f"{self._second_text},{millis:03d}"

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer or self._stream is None:
            return
        lines = []
        for when, method, code, latency_ms, peer, request_id in self._buffer:
            message = f"{method} {code} {latency_ms:.2f} ms peer={peer} request_id={request_id}"
            if not self._json:
                lines.append(f"{self._time(when)} INFO server.access {message}\n")
            elif _PLAIN.fullmatch(peer) and _PLAIN.fullmatch(request_id) and _PLAIN.fullmatch(method):
                # Nothing to escape: the JsonFormatter's line, without building and dumping a dict.
                lines.append(
                    f'{{"time": "{self._time(when)}", "level": "INFO", "logger": "server.access", '
                    f'"message": "{message}", "request_id": "{request_id}", "method": "{method}", '
                    f'"code": "{code}", "latency_ms": {latency_ms!r}, "peer": "{peer}"}}\n'
                )
            else:
                entry = {"time": self._time(when), "level": "INFO", "logger": "server.access",
                         "message": message, "request_id": request_id, "method": method,
                         "code": code, "latency_ms": latency_ms, "peer": peer}
                lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        self._buffer.clear()
        try:
            self._stream.write("".join(lines))
            self._stream.flush()
        except (OSError, ValueError):  # a closed stderr must not fail calls
            pass


access_log = AccessLog()


# TensorFlow Lite's own log lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU."),
# written by its C++ code straight to file descriptor 2.
_NATIVE_LINE = re.compile(rb"(VERBOSE|INFO|WARNING|ERROR): (.*)")
_NATIVE_LEVELS = {b"VERBOSE": logging.DEBUG, b"INFO": logging.DEBUG, b"WARNING": logging.WARNING,
                  b"ERROR": logging.ERROR}


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
            native = _NATIVE_LINE.fullmatch(line.rstrip(b"\r\n"))
            if native is None:
                other.append(line)
            else:
                logger.log(_NATIVE_LEVELS[native.group(1)], "%s",
                           native.group(2).decode("utf-8", "replace"))
        if other:
            with contextlib.suppress(OSError):
                os.write(2, b"".join(other))


def configure_logging(level: str, log_format: str = "auto") -> None:
    """Root logging to stderr: JSON lines, or text (``auto``: text on a terminal, else JSON)."""
    is_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    handler = logging.StreamHandler(sys.stderr)
    json_lines = resolve_format(log_format, is_terminal) == "json"
    handler.setFormatter(JsonFormatter() if json_lines else text_formatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    access_log.direct(sys.stderr, json_lines)  # the same lines, written in batches
