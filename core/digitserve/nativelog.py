"""Lines native libraries write straight to file descriptor 2 (LiteRT's ``INFO: Created TensorFlow
Lite XNNPACK delegate``, absl's ``E0000 00:00:1795916047.597076 9767 tcp_server_posix.cc:220] ...``
of grpc core and TensorFlow), made log records: ``native_record`` reads one line,
``native_stderr_logged`` logs those written while a block runs, ``bridge_native_stderr`` turns
all of a process's into JSON lines (``mnist-serve``) or text records (``mnist-train``). Standard
library only, so the inference package, the server's logging and the trainer share it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

# TensorFlow Lite's ("INFO: ...") and absl's (the format of grpc core and TensorFlow) lines.
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
    """(level, message, absl's ``file:line`` or None) of a LiteRT or absl line (LiteRT's INFO and
    ``_BENIGN`` lines are DEBUG), or None for any other line."""
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
    return level, shorten(text, MAX_NATIVE_CHARS), source


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, its full length said when it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


@contextlib.contextmanager
def native_stderr_logged(logger: logging.Logger, level: int | None = None) -> Iterator[list[str]]:
    """Turns the native lines written to file descriptor 2 while the block runs (LiteRT's delegate
    notice, grpc core's line on a port it could not bind) into records of ``logger`` (all at
    ``level`` when given), so JSON output stays JSON; yields a list that holds their messages after
    the block. Other lines written meanwhile are written back unchanged after it."""
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
            if (native := native_record(line)) is None:
                other.append(line)
            else:
                messages.append(native[1])
                logger.log(native[0] if level is None else level, "%s", native[1])
        if other:
            with contextlib.suppress(OSError):
                os.write(2, b"".join(other))


NATIVE_LOGGER = "native"
FAULT_LOGGER = "faulthandler"  # the logger of the lines of a crash's dump (faulthandler)
FAULT_LINE = b"Fatal Python error: "


_BRIDGE_MAIN = ("import sys; from digitserve.nativelog import run_bridge; "
                "run_bridge(int(sys.argv[1]), *sys.argv[2:])")


def bridge_native_stderr(level: int = logging.DEBUG, text_format: str | None = None) -> TextIO | None:
    """Makes file descriptor 2 a pipe to a bridge process (``run_bridge``) that writes each native
    line to the real stderr as a JSON record (logger ``native``, or ``faulthandler``, CRITICAL,
    for a crash's dump; below ``level`` dropped), or with ``text_format`` as a text record. A
    process, not a thread: it reads the pipe to its end, so a dying process's last lines are kept.
    Returns a stream on the real stderr for Python's logging (with ``text_format`` also
    ``sys.stderr``), or None, stderr untouched, when no bridge could be started."""
    import subprocess

    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    fds: list[int] = []  # the real stderr, then the pipe's ends
    try:
        fds.append(os.dup(2))
        fds.extend(os.pipe())
        real, read_end, write_end = fds
        subprocess.Popen(
            [sys.executable, "-c", _BRIDGE_MAIN, str(level), *([text_format] if text_format else [])],
            stdin=read_end, stdout=real, stderr=real, close_fds=True)
    except OSError:
        for fd in fds:
            os.close(fd)
        return None
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    stream = open(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    if text_format is not None:
        # Python's own writes skip the pipe: a progress bar's carriage returns reach the terminal.
        sys.stderr = stream
    # Else sys.stderr stays on the pipe: what Python code writes there without logging (a
    # library's print_exc(), the faulthandler's dump of a crash) becomes JSON lines too.
    return stream


def run_bridge(level: int = logging.DEBUG, text_format: str | None = None) -> None:
    """The bridge process: standard input (the server's file descriptor 2) to standard output (the
    real stderr) line by line, until every writer closed."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the server's group's signals
        signal.signal(signum, signal.SIG_IGN)  # it ends when the server does, at end of input
    out = sys.stdout.buffer
    text = None if text_format is None else logging.Formatter(text_format)
    fault = False  # after "Fatal Python error": the faulthandler's dump, to the end of input
    for line in sys.stdin.buffer:
        fault = fault or line.startswith(FAULT_LINE)
        native = None if fault and text is None else native_record(line)
        if (text is not None and native is None) or (text is None and line.startswith(b"{")):
            out.write(line if line.endswith(b"\n") else line + b"\n")  # as it is
        elif text is not None:
            if native is not None and native[0] >= level:
                severity, message, source = native
                record = logging.makeLogRecord({
                    "name": NATIVE_LOGGER, "levelno": severity, "levelname": logging.getLevelName(severity),
                    "msg": message if source is None else f"{message} [{source}]"})
                out.write(text.format(record).encode("utf-8", "backslashreplace") + b"\n")
        else:
            severity, message, source = native if native is not None else (
                logging.CRITICAL if fault else logging.WARNING,
                shorten(line.rstrip(b"\r\n").decode("utf-8", "replace"), MAX_NATIVE_CHARS), None)
            if severity < level or (not message and native is None):
                continue
            entry: dict[str, Any] = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": logging.getLevelName(severity), "logger": FAULT_LOGGER if fault else NATIVE_LOGGER,
                "message": message,
            }
            if source is not None:
                entry["source"] = source
            out.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
        out.flush()
