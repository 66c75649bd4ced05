"""Logs: JSON lines or text, one access line per call with its request id, no pixels."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from digitserve.nativelog import native_record, native_stderr_logged
from digitserve.server.logs import (
    AccessLog,
    GrpcRecordFilter,
    JsonFormatter,
    current_request_id,
    resolve_format,
)
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerProcess, ServerThread
from tests.support import FakeModel


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Records of the ``server`` loggers, formatted as the server would in JSON mode."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("digitserve.server")
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


def entries(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_formatter_writes_one_object_per_record() -> None:
    logger = logging.getLogger("tests.logging")
    formatter = JsonFormatter()
    record = logger.makeRecord("tests.logging", logging.WARNING, __file__, 1, "loaded %s in %.1fs",
                               ("v3", 1.25), None, extra={"version": 3})
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "tests.logging"
    assert entry["message"] == "loaded v3 in 1.2s" and entry["version"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(entry["time"]))
    assert "request_id" not in entry and "exception" not in entry
    token = current_request_id.set("req-1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logger.makeRecord("tests.logging", logging.ERROR, __file__, 1, "failed: %s",
                                   ("x\ny",), sys.exc_info())
    finally:
        current_request_id.reset(token)
    token = current_request_id.set("req-2")
    entry = json.loads(formatter.format(failed))
    current_request_id.reset(token)
    assert entry["request_id"] == "req-2" and entry["message"] == "failed: x\ny"
    assert "RuntimeError: boom" in str(entry["exception"])


@pytest.mark.parametrize(
    ("given", "terminal", "expected"),
    [("auto", True, "text"), ("auto", False, "json"), ("json", True, "json"), ("text", False, "text")],
)
def test_auto_format_is_text_only_on_a_terminal(given: str, terminal: bool, expected: str) -> None:
    assert resolve_format(given, terminal) == expected


def test_one_access_line_per_call_and_no_pixels(
    fake_server: ServerThread, json_log: io.StringIO
) -> None:
    """The fake model on purpose: an image crashes it, for the INTERNAL call's line."""
    good = np.full((1, 784), 0.7071, np.float32)
    bad = good.copy()
    bad[0, 5] = 1.2345
    crash = good.copy()
    crash[0, 0] = FakeModel.CRASH_PIXEL
    with grpc.insecure_channel(fake_server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)

        def predict(images: np.ndarray, request_id: str) -> grpc.StatusCode:
            req = pb.PredictRequest(images=[pb.Image(floats=pb.FloatPixels(values=r.tolist()))
                                            for r in images])
            try:
                stub.Predict(req, metadata=(("x-request-id", request_id),))
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        assert predict(good, "call-ok") == grpc.StatusCode.OK
        assert predict(bad, "call-bad") == grpc.StatusCode.INVALID_ARGUMENT
        assert predict(crash, "call-crash") == grpc.StatusCode.INTERNAL
        stub.GetModelInfo(pb.GetModelInfoRequest())
    log = entries(json_log)
    access = [e for e in log if e["logger"] == "digitserve.server.access"]
    assert [(e["method"], e["code"]) for e in access] == [
        ("/digitserve.v1.DigitService/Predict", "OK"),
        ("/digitserve.v1.DigitService/Predict", "INVALID_ARGUMENT"),
        ("/digitserve.v1.DigitService/Predict", "INTERNAL"),
        ("/digitserve.v1.DigitService/GetModelInfo", "OK"),
    ]
    assert [e["request_id"] for e in access[:3]] == ["call-ok", "call-bad", "call-crash"]
    assert re.fullmatch(r"[0-9a-f]{32}", str(access[3]["request_id"]))
    for e in access:
        assert isinstance(e["latency_ms"], float) and 0 <= e["latency_ms"] < 10_000
        assert str(e["peer"]).startswith("ipv4:127.0.0.1:")
        assert f"{e['method']} {e['code']} " in str(e["message"])
    # The crash's traceback is logged inside the call, so it carries the call's request id.
    (crash_entry,) = [e for e in log if e["logger"] == "digitserve.server.servicer"]
    assert crash_entry["request_id"] == "call-crash" and "crashed on purpose" in str(
        crash_entry["exception"])
    text = json_log.getvalue()
    assert "0.7071" not in text and "1.2345" not in text  # pixels never reach the log


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_server_process_logs_in_the_chosen_format(
    spawn: type[ServerProcess], tmp_path: Path, log_format: str
) -> None:
    (tmp_path / "absent" / "1").mkdir(parents=True)  # a version it lists, then refuses (no metadata)
    server = spawn("--model-repo", str(tmp_path), "--model-name", "absent", "--log-format", log_format,
                   "--exit-if-no-model")
    assert server.wait(60) == 1
    assert server.port is not None  # the "listening on" line was found, as the other tests need
    ours = [line for line in server.lines if "listening on" in line or "cannot load model" in line]
    assert len(ours) == 2, server.log
    for line in ours:
        if log_format == "json":
            entry = json.loads(line)
            assert entry["level"] in ("INFO", "ERROR") and entry["logger"] == "digitserve.server.app"
        else:
            assert not line.startswith("{") and " digitserve.server.app " in line


@pytest.mark.parametrize("peer", ["ipv4:127.0.0.1:5000", 'unix:/tmp/a "quoted" \\ path'])
def test_direct_access_lines_equal_the_formatter_s_and_are_written_in_batches(peer: str) -> None:
    stream = io.StringIO()
    access = AccessLog()
    access.direct(stream, json_lines=True)
    calls = [("/digitserve.v1.DigitService/Predict", "OK", 1.25, peer, "abc-1"),
             ("/x.Y/Z", "INVALID_ARGUMENT", 0.5, peer, "0123456789abcdef0123456789abcdef")]

    async def scenario() -> None:
        for call in calls:
            access.write(*call)
        assert stream.getvalue() == ""  # buffered ...
        await asyncio.sleep(access.flush_interval + 0.2)  # ... until the flush timer

    asyncio.run(scenario())
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    logger = logging.getLogger("digitserve.server.access")
    for line, (method, code, latency, call_peer, request_id) in zip(lines, calls, strict=True):
        record = logger.makeRecord(
            "digitserve.server.access", logging.INFO, __file__, 1, "%s %s %.2f ms peer=%s request_id=%s",
            (method, code, latency, call_peer, request_id), None,
            extra={"method": method, "code": code, "latency_ms": latency, "peer": call_peer,
                   "request_id": request_id})
        token = current_request_id.set(request_id)  # as while a call is served
        expected = json.loads(JsonFormatter().format(record))
        current_request_id.reset(token)
        got = json.loads(line)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got.pop("time"))
        expected.pop("time")
        assert got == expected and list(got) == list(expected)  # same fields, same order


def test_direct_access_lines_in_text_and_written_on_flush() -> None:
    stream = io.StringIO()
    access = AccessLog()
    access.direct(stream, json_lines=False)
    access.write("/a.B/C", "OK", 2.0, "ipv4:127.0.0.1:1", "r1")  # no event loop: written at once
    access.write("/a.B/C", "NOT_FOUND", 3.5, "ipv4:127.0.0.1:1", "r2")
    access.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO digitserve.server.access "
                        r"/a.B/C NOT_FOUND 3.50 ms peer=ipv4:127.0.0.1:1 request_id=r2", lines[1])


def test_native_stderr_lines_become_records_and_others_pass_through(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="litert")
    with native_stderr_logged(logging.getLogger("litert")):
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b'{"level": "INFO", "message": "another thread\'s line"}\n')
        os.write(2, b"WARNING: something odd\n")
    assert capfd.readouterr().err == '{"level": "INFO", "message": "another thread\'s line"}\n'
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("litert", logging.DEBUG, "Created TensorFlow Lite XNNPACK delegate for CPU."),
        ("litert", logging.WARNING, "something odd"),
    ]


def test_a_litert_interpreter_writes_no_bare_line_to_stderr(tiny_repo: Path) -> None:
    # A fresh process: LiteRT prints its delegate notice once per process.
    script = (
        "import logging, sys; import numpy as np; from pathlib import Path\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format='%(name)s %(message)s')\n"
        "from digitserve.inference import LiteRTRunner\n"
        "runner = LiteRTRunner(Path(sys.argv[1]).read_bytes())\n"
        "print(runner(np.zeros((2, 784), np.float32)).shape)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tiny_repo / "tiny" / "1" / "model.tflite")],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "TensorFlow Lite" not in done.stderr, done.stderr
    assert "litert Created TensorFlow Lite XNNPACK delegate for CPU." in done.stdout.splitlines()
    assert done.stdout.splitlines()[-1] == "(2, 10)"


def test_absl_and_litert_lines_are_recognised() -> None:
    assert native_record(b"E1129 01:39:48.284563   19318 posix_engine_listener.cc:164] File descriptor "
                         b"limit reached. Retrying.\n") == (
        logging.ERROR, "File descriptor limit reached. Retrying.", "posix_engine_listener.cc:164")
    assert native_record(b"I0000 00:00:1795916047.597076    9767 loader.cc:220] Running op\n") == (
        logging.INFO, "Running op", "loader.cc:220")
    assert native_record(b"WARNING: something odd\n") == (logging.WARNING, "something odd", None)
    assert native_record(b'{"level": "INFO"}\n') is None
    assert native_record(b"plain words\n") is None
    _, message, _ = native_record(b"W0000 00:00:1.0 1 x.cc:1] " + b"a" * 5000) or (0, "", None)
    assert message == "a" * 2000 + "… (5000 characters)"


def test_grpc_records_become_one_short_line_and_are_rate_limited() -> None:
    now = [0.0]
    grpc_filter = GrpcRecordFilter(max_chars=40, interval=10.0, burst=2, clock=lambda: now[0])
    logger = logging.getLogger("grpc._cython.cygrpc")

    def record(value: bytes, lineno: int = 7) -> logging.LogRecord:
        try:
            value.decode()
        except UnicodeDecodeError:
            exc_info = sys.exc_info()
        return logger.makeRecord(logger.name, logging.ERROR, "cygrpc.pyx", lineno,
                                 "Invalid encoding on %s", (value,), exc_info)

    first = record(b"\xff" * 100)
    assert grpc_filter.filter(first)
    # The message, then the exception's last line, cut to 40 characters and its length said.
    assert first.getMessage() == "Invalid encoding on b'\\xff\\xff\\xff\\xff\\x\u2026 (515 characters)"
    assert first.exc_info is None and "\n" not in first.getMessage()
    assert grpc_filter.filter(record(b"\xfe"))
    assert not grpc_filter.filter(record(b"\xfe"))  # a third from the same place within 10 s
    assert not grpc_filter.filter(record(b"\xfd"))
    assert grpc_filter.filter(record(b"\xfe", lineno=8))  # another place in grpc's code
    other = logger.makeRecord("digitserve.server.app", logging.ERROR, "app.py", 1, "x" * 100, (), None)
    assert grpc_filter.filter(other) and other.getMessage() == "x" * 100  # not grpc's: untouched
    now[0] = 10.0
    later = record(b"\xfe")
    assert grpc_filter.filter(later)
    assert later.suppressed == 2 and later.getMessage().endswith("(2 like it suppressed)")  # type: ignore[attr-defined]


def test_json_mode_bridges_native_stderr_lines_to_json(tmp_path: Path) -> None:
    # A process in JSON mode: what native code writes to file descriptor 2 comes out as JSON,
    # including the last line of a process that dies at once after writing it.
    script = (
        "import logging, os\n"
        "from digitserve.server.logs import configure_logging\n"
        "configure_logging('INFO', 'json')\n"
        "logging.getLogger('digitserve.server.test').info('python line')\n"
        "os.write(2, b'E1129 01:39:48.284563   19318 posix_engine_listener.cc:164] File descriptor "
        "limit reached. Retrying.\\n')\n"
        "os.write(2, b'not a known format\\n')\n"
        "os.write(2, b'F0000 00:00:1.5 1 check.cc:9] Check failed: x\\n')\n"
        "os._exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 3
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert {(e["logger"], e["level"], e["message"]) for e in entries} == {
        ("digitserve.server.test", "INFO", "python line"),
        ("native", "ERROR", "File descriptor limit reached. Retrying."),
        ("native", "WARNING", "not a known format"),
        ("native", "CRITICAL", "Check failed: x"),
    }
    assert next(e.get("source") for e in entries if e["logger"] == "native") == "posix_engine_listener.cc:164"
