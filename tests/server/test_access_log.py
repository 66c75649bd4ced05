"""The access log's default, off (issue 26: as TF Serving and Triton; a line per call costs about
3 % of a 1-image call), and its modes: ``--access-log auto`` writes them except as text lines on a
terminal (issue 14: one line per call flooded a terminal, 27,326 lines in one short session);
``on`` and ``off`` say so whatever the output. Each case is a real ``python -m digitserve.server`` whose
stderr is a terminal (a pseudo-terminal) or a pipe, one call, then SIGTERM: the shutdown line
shows the whole log was read (the access lines are written before it)."""

from __future__ import annotations

import errno
import os
import pty
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from digitserve.client.client import DigitClient
from digitserve.server.logs import resolve_access_log
from tests.support import REPO_ROOT, wait_for

HEALTH_CHECK = "/grpc.health.v1.Health/Check OK "


class Server:
    """``python -m digitserve.server --port 0 ARGS`` with stderr on a terminal or a pipe."""

    def __init__(self, repo: Path, *args: str, terminal: bool) -> None:
        self.text = ""
        command = [sys.executable, "-m", "digitserve.server", "--port", "0", "--model-repo", str(repo),
                   "--model-name", "tiny", "--reload-interval", "0", *args]
        if terminal:
            self._read_fd, writer = pty.openpty()
            self.proc = subprocess.Popen(command, cwd=REPO_ROOT, stderr=writer)
            os.close(writer)
        else:
            self.proc = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE)
            assert self.proc.stderr is not None
            self._read_fd = self.proc.stderr.fileno()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 65536)
            except OSError as error:  # a pseudo-terminal whose other end closed
                assert error.errno == errno.EIO
                break
            if not data:
                break
            self.text += data.decode("utf-8", "replace")

    def target(self) -> str:
        match = wait_for(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", self.text), 60, "listening")
        return f"127.0.0.1:{match.group(1)}"

    def stop(self) -> str:
        """SIGTERM; the whole log once the process has exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.text
        self._reader.join(10)
        if self.proc.stderr is None:
            os.close(self._read_fd)
        else:
            self.proc.stderr.close()
        return self.text


@pytest.mark.parametrize(("terminal", "args", "access_lines"), [
    (True, (), False),  # off by default (issue 26: as TF Serving and Triton)
    (False, (), False),
    (True, ("--access-log", "on"), True),
    (False, ("--access-log", "on"), True),
    (True, ("--access-log", "auto"), False),  # auto: text on a terminal, a person reading
    (True, ("--access-log", "auto", "--log-format", "json"), True),  # JSON lines are for machines
    (False, ("--access-log", "auto"), True),  # a pipe: JSON lines
    (False, ("--access-log", "auto", "--log-format", "text"), True),  # text into a file or a pipe
    (False, ("--access-log", "off"), False),
])
def test_the_access_log_default_and_the_flag(
    tiny_repo: Path, terminal: bool, args: tuple[str, ...], access_lines: bool
) -> None:
    server = Server(tiny_repo, *args, terminal=terminal)
    try:
        with DigitClient(server.target(), timeout=30) as client:
            assert client.wait_until_serving(60) == "SERVING"
            assert client.health() == "SERVING"
    finally:
        log = server.stop()
    assert "stopped after draining" in log, log
    assert (HEALTH_CHECK in log) is access_lines, log


def test_auto_is_off_only_for_text_on_a_terminal() -> None:
    assert [resolve_access_log(mode, json_lines, terminal)
            for mode in ("auto", "on", "off")
            for json_lines in (True, False)
            for terminal in (True, False)] == [
        True, True, False, True,  # auto: JSON anywhere, text on a terminal, text elsewhere
        True, True, True, True,
        False, False, False, False,
    ]
