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
from collections.abc import Callable, Iterator
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


access_logger = logging.getLogger("digitserve.server.access")
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
                    f'{{"time": "{self._time(when)}", "level": "INFO", "logger": "digitserve.server.access", '
                    f'"message": "{message}", "request_id": "{request_id}", "method": "{method}", '
                    f'"code": "{code}", "latency_ms": {latency_ms!r}, "peer": "{peer}"}}\n'
                )
            else:
                entry = {"time": self._time(when), "level": "INFO", "logger": "digitserve.server.access",
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


# Lines native code writes straight to file descriptor 2: TensorFlow Lite's ("INFO: Created
# TensorFlow Lite XNNPACK delegate for CPU.") and absl's, the format of grpc core and TensorFlow
# ("E0000 00:00:1795916047.597076    9767 tcp_server_posix.cc:220] File descriptor limit reached.
# Retrying.").
_NATIVE_LINE = re.compile(rb"(VERBOSE|INFO|WARNING|ERROR): (.*)")
_NATIVE_LEVELS = {b"VERBOSE": logging.DEBUG, b"INFO": logging.DEBUG, b"WARNING": logging.WARNING,
                  b"ERROR": logging.ERROR}
_ABSL_LINE = re.compile(rb"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ ([^\]\s]+:\d+)\] ?(.*)")
_ABSL_LEVELS = {b"I": logging.INFO, b"W": logging.WARNING, b"E": logging.ERROR, b"F": logging.CRITICAL}
MAX_NATIVE_CHARS = 2000  # a native line longer than this is cut (its length said)
# Native lines that report nothing wrong, whatever their level: DEBUG records. TensorFlow 2.21's
# ERROR on every tf.data graph it rewrites ("This may be expected [...]. Unknown attributes will be
# ignored.", its own words), and absl's notice before its first line.
_BENIGN = (
    re.compile(r"NodeDef mentions attribute \S+ which is not in the op definition.*Unknown attributes "
               r"will be ignored\.", re.DOTALL),
    re.compile(r"All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
)


def native_record(line: bytes) -> tuple[int, str, str | None] | None:
    """(level, message, source) of one line in a native library's format (LiteRT's or absl's;
    LiteRT's INFO is DEBUG here, and so are the lines ``_BENIGN`` knows), or None for any other
    line. ``source`` is absl's ``file:line``."""
    line = line.rstrip(b"\r\n")
    if (absl := _ABSL_LINE.fullmatch(line)) is not None:
        level, source, message = _ABSL_LEVELS[absl.group(1)], absl.group(2).decode(errors="replace"), \
            absl.group(3)
    elif (lite := _NATIVE_LINE.fullmatch(line)) is not None:
        level, source, message = _NATIVE_LEVELS[lite.group(1)], None, lite.group(2)
    else:
        return None
    text = message.decode("utf-8", "replace")
    if any(benign.match(text) for benign in _BENIGN):
        level = logging.DEBUG
    return level, _cut(text, MAX_NATIVE_CHARS), source


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


@contextlib.contextmanager
def native_stderr_logged(logger: logging.Logger, level: int | None = None) -> Iterator[list[str]]:
    """Turns the lines a native library writes to file descriptor 2 while the block runs (LiteRT's
    delegate notice, when an interpreter first allocates its tensors; grpc core's line on a port
    it could not bind) into records of ``logger``, so that a stream of JSON lines stays JSON; its
    INFO lines become DEBUG records, and every record is at ``level`` when one is given (a failure
    the caller reports in its own words). Yields a list that holds the native lines' messages
    once the block is over. Anything else written to stderr meanwhile (another thread's log
    lines) is written back unchanged after the block. Without a file descriptor 2 to redirect,
    the block runs as it is."""
    messages: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield messages
        return
    with tempfile.TemporaryFile() as capture:  # a file, not a pipe: writers never block on it
        os.dup2(capture.fileno(), 2)
        try:
            yield messages
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
                messages.append(native[1])
                logger.log(native[0] if level is None else level, "%s", native[1])
        if other:
            with contextlib.suppress(OSError):
                os.write(2, b"".join(other))


# The logger of the records the bridge makes of native lines.
NATIVE_LOGGER = "native"


_BRIDGE_MAIN = ("import sys; from digitserve.server.logs import run_bridge; "
                "run_bridge(int(sys.argv[1]), *sys.argv[2:])")


def bridge_native_stderr(level: int = logging.DEBUG, text_format: str | None = None) -> TextIO | None:
    """Makes everything native code writes to file descriptor 2 for the rest of the process's life
    (grpc core's absl lines, such as ``File descriptor limit reached``; TensorFlow's) a JSON line:
    file descriptor 2 becomes a pipe read by a small process of its own that writes each line as a
    JSON record (logger ``native``, ``source`` = absl's file:line) to the real stderr, and JSON
    lines as they are; native records below ``level`` are dropped. With ``text_format`` (a
    logging format: ``mnist-train``'s) native lines become text records in that format instead,
    and other lines pass as they are. A process, not a thread: it reads the pipe to its end, so
    the last lines of a process that dies (a fatal absl CHECK, a fault) are kept. Returns a
    stream on the real stderr for Python's own lines (which never go through the pipe), or None
    if there is no file descriptor 2 or no bridge could be started, leaving stderr as it was."""
    import subprocess

    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:
        return None
    try:
        read_end, write_end = os.pipe()
    except OSError:
        os.close(real)
        return None
    try:
        subprocess.Popen(
            [sys.executable, "-c", _BRIDGE_MAIN, str(level), *([text_format] if text_format else [])],
            stdin=read_end, stdout=real, stderr=real, close_fds=True,
        )
    except OSError:
        for fd in (real, read_end, write_end):
            os.close(fd)
        return None
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    stream = open(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    sys.stderr = stream  # Python's own writes (tracebacks at exit included) skip the pipe
    return stream


def run_bridge(level: int = logging.DEBUG, text_format: str | None = None) -> None:
    """The bridge process: standard input (the server's file descriptor 2) to standard output (the
    real stderr), a JSON line per line (``text_format``: native lines as text records, others as
    they are); ends at the end of its input (when every writer closed)."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the server's group's signals
        signal.signal(signum, signal.SIG_IGN)  # it ends when the server does, at end of input
    out = sys.stdout.buffer
    text = None if text_format is None else logging.Formatter(text_format)
    for line in sys.stdin.buffer:
        if text is not None:
            native = native_record(line)
            if native is None:
                out.write(line if line.endswith(b"\n") else line + b"\n")
            elif native[0] >= level:
                severity, message, source = native
                record = logging.makeLogRecord({
                    "name": NATIVE_LOGGER, "levelno": severity, "levelname": logging.getLevelName(severity),
                    "msg": message if source is None else f"{message} [{source}]"})
                out.write(text.format(record).encode("utf-8", "backslashreplace") + b"\n")
        elif line.startswith(b"{"):  # a JSON line (a library writing our own records): as it is
            out.write(line if line.endswith(b"\n") else line + b"\n")
        else:
            native = native_record(line)
            severity, message, source = native if native is not None else (
                logging.WARNING, _cut(line.rstrip(b"\r\n").decode("utf-8", "replace"), MAX_NATIVE_CHARS),
                None)
            if severity < level or (not message and native is None):
                continue
            entry: dict[str, Any] = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": logging.getLevelName(severity), "logger": NATIVE_LOGGER, "message": message,
            }
            if source is not None:
                entry["source"] = source
            out.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
        out.flush()


class GrpcRecordFilter(logging.Filter):
    """grpc's own Python records (loggers ``grpc.*``) made safe to write when a client controls
    what they say: one line of at most ``max_chars`` characters (a traceback becomes its last
    line), and at most ``burst`` records per ``interval`` seconds from each place in grpc's code
    (the next one let through says how many were dropped, field ``suppressed``). Before this, one
    call with a 4 KB header value that is not UTF-8 made grpc write 40 KB of records."""

    def __init__(self, max_chars: int = 300, interval: float = 10.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.max_chars = max_chars
        self.interval = interval
        self.burst = burst
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
        record.msg = _cut(" ".join(message.split()), self.max_chars)
        record.args = None
        record.exc_info = record.exc_text = None
        record.stack_info = None
        if dropped:
            record.suppressed = dropped
            record.msg += f" ({dropped} like it suppressed)"
        return True


ACCESS_LOG_MODES = ("auto", "on", "off")


def resolve_access_log(mode: str, json_lines: bool, is_terminal: bool) -> bool:
    """Whether calls get access lines: ``on``, ``off``, or ``auto``: on, except for text lines
    written to a terminal (a person reading, whom a line per call would flood; JSON lines go to
    machines, and text redirected to a file or a pipe is kept, as an access log file would be)."""
    if mode not in ACCESS_LOG_MODES:
        raise ValueError(f"access log {mode!r} is not one of {', '.join(ACCESS_LOG_MODES)}")
    if mode == "auto":
        return json_lines or not is_terminal
    return mode == "on"


def configure_logging(level: str, log_format: str = "auto", native_stderr: bool = True,
                      access: str = "auto") -> None:
    """Root logging to stderr: JSON lines, or text (``auto``: text on a terminal, else JSON). In
    JSON mode with ``native_stderr`` (a process that serves), what native code writes to stderr
    (grpc core, TensorFlow) becomes JSON lines too (``bridge_native_stderr``). grpc's own Python
    records are cut to one line and rate-limited (``GrpcRecordFilter``). ``access``: whether calls
    get access lines (``resolve_access_log``; they also need ``level`` INFO or below)."""
    is_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    json_lines = resolve_format(log_format, is_terminal) == "json"
    # Off: the access logger's own level is above INFO, whatever the root's (AccessLog.enabled).
    access_logger.setLevel(logging.NOTSET if resolve_access_log(access, json_lines, is_terminal)
                           else logging.WARNING)
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.DEBUG)
    stream = (bridge_native_stderr(threshold) if json_lines and native_stderr else None) or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else text_formatter())
    handler.addFilter(GrpcRecordFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    access_log.direct(stream, json_lines)  # the same lines, written in batches
