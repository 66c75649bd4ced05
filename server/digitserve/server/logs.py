"""Log formats for the server: JSON lines for machines, one readable line for people, and the
request id of the call being served (a context variable the formatters add to every record)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from digitserve.nativelog import bridge_native_stderr, shorten

FORMATS = ("auto", "json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Set by the telemetry interceptor for the duration of one call (one asyncio task).
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id`` while serving a call, the ``extra=`` fields, and ``exception`` or ``stack``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        if (request_id := current_request_id.get()) is not None:
            entry["request_id"] = request_id
        entry.update((key, value) for key, value in record.__dict__.items()
                     if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def resolve_format(log_format: str, is_terminal: bool) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal and JSON anywhere else."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    return ("text" if is_terminal else "json") if log_format == "auto" else log_format


access_logger = logging.getLogger("digitserve.server.access")
_PLAIN = re.compile(r"[A-Za-z0-9._:/+=\[\]-]*")  # needs no JSON escaping (peers, request ids)


class AccessLog:
    """One line per call (method, code, latency, peer, request id) on the access logger; off below
    INFO. After ``direct()`` (mnist-serve) it formats the lines itself, exactly as the handler
    would, and writes them in batches at most ``flush_interval`` seconds late (nginx's ``buffer=
    flush=``): a call costs a tuple appended instead of a record, a formatter and a write (a tenth
    of a Predict's CPU). App.stop() writes what is left."""

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
            fields = {"method": method, "code": code, "latency_ms": latency_ms, "peer": peer,
                      "request_id": request_id}
            access_logger.info("%s %s %.2f ms peer=%s request_id=%s", method, code, latency_ms, peer,
                               request_id, extra=fields)
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
            self._second_text = (stamp.strftime("%Y-%m-%dT%H:%M:%S") if self._json
                                 else stamp.astimezone().strftime("%Y-%m-%d %H:%M:%S"))
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
                lines.append(f"{self._time(when)} INFO digitserve.server.access {message}\n")
            elif _PLAIN.fullmatch(peer) and _PLAIN.fullmatch(request_id) and _PLAIN.fullmatch(method):
                # Nothing to escape: the JsonFormatter's line, without building and dumping a dict.
                lines.append(
                    f'{{"time": "{self._time(when)}", "level": "INFO", "logger": "digitserve.server.access", '
                    f'"message": "{message}", "request_id": "{request_id}", "method": "{method}", '
                    f'"code": "{code}", "latency_ms": {latency_ms!r}, "peer": "{peer}"}}\n')
            else:
                entry = {"time": self._time(when), "level": "INFO", "logger": "digitserve.server.access",
                         "message": message, "request_id": request_id, "method": method,
                         "code": code, "latency_ms": latency_ms, "peer": peer}
                lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        self._buffer.clear()
        with contextlib.suppress(OSError, ValueError):  # a closed stderr must not fail calls
            self._stream.write("".join(lines))
            self._stream.flush()


access_log = AccessLog()


class GrpcRecordFilter(logging.Filter):
    """grpc's own Python records (``grpc.*``), which a client controls, cut to one line of at most
    ``max_chars`` and to ``burst`` per ``interval`` seconds from each place in grpc's code (the next
    says how many were dropped, field ``suppressed``). Before, one call with a 4 KB non-UTF-8 header
    value made grpc write 40 KB of records."""

    def __init__(self, max_chars: int = 300, interval: float = 10.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock, self.max_chars, self.interval, self.burst = clock, max_chars, interval, burst
        self._windows: dict[tuple[str, str, int], list[float]] = {}  # [window start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "grpc" and not record.name.startswith("grpc."):
            return True
        now = self.clock()
        key = (record.name, record.pathname, record.lineno)
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            dropped = 0 if window is None else int(window[2])
            window = self._windows[key] = [now, 0, 0]
        else:
            dropped = 0
        if window[1] >= self.burst:
            window[2] += 1
            return False
        window[1] += 1
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__}: {exc}"
        record.msg = shorten(" ".join(message.split()), self.max_chars)
        record.args = record.exc_info = record.exc_text = record.stack_info = None
        if dropped:
            record.suppressed = dropped
            record.msg += f" ({dropped} like it suppressed)"
        return True


ACCESS_LOG_MODES = ("auto", "on", "off")


def resolve_access_log(mode: str, json_lines: bool, is_terminal: bool) -> bool:
    """Whether calls get access lines: ``on``, ``off``, or ``auto``: on, except for text lines on a
    terminal (a person, whom a line per call would flood)."""
    if mode not in ACCESS_LOG_MODES:
        raise ValueError(f"access log {mode!r} is not one of {', '.join(ACCESS_LOG_MODES)}")
    return json_lines or not is_terminal if mode == "auto" else mode == "on"


def configure_logging(level: str, log_format: str = "auto", native_stderr: bool = True,
                      access: str = "auto") -> None:
    """Root logging to stderr: JSON lines, or text (``auto``: text on a terminal). In JSON mode with
    ``native_stderr`` native code's lines become JSON too (``bridge_native_stderr``); grpc's records
    are filtered (``GrpcRecordFilter``); ``access`` as ``resolve_access_log``; faulthandler on."""
    is_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    json_lines = resolve_format(log_format, is_terminal) == "json"
    # Off: the access logger's own level is above INFO, whatever the root's (AccessLog.enabled).
    access_logger.setLevel(logging.NOTSET if resolve_access_log(access, json_lines, is_terminal)
                           else logging.WARNING)
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.DEBUG)
    stream = (bridge_native_stderr(threshold) if json_lines and native_stderr else None) or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(GrpcRecordFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    access_log.direct(stream, json_lines)  # the same lines, written in batches
    enable_fault_traces()


def enable_fault_traces() -> None:
    """A crash (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL) leaves every thread's Python stack in the
    log (in JSON mode the bridge makes it CRITICAL records of logger ``faulthandler``)."""
    with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        faulthandler.enable(file=sys.stderr, all_threads=True)
