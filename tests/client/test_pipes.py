"""mnist-client whose reader leaves early (``| head -3``) ends quietly: no BrokenPipeError
traceback, exit 141 as a shell reports of ``cat``; against a real server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.servers import ServerThread


@pytest.mark.parametrize("command", [["info"], ["models"], ["health"]])
def test_a_reader_that_left_is_quiet(command: list[str], tiny_server: ServerThread) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "digitserve.client", "--target",
                             tiny_server.target, *command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader leaves before a line is written: every write fails
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.decode()) == (141, "")

