"""A command whose reader leaves early (``mnist-client info | head -3``) ends quietly, as ``cat``
does: no ``BrokenPipeError`` traceback, exit 141 (128 + SIGPIPE, what a shell reports of a
command its pipe's reader left), so that ``set -o pipefail`` still tells it from a finished one."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_BROKEN_PIPE = 141


def quiet_on_broken_pipe(command: Callable[[], int]) -> int:
    """``command()``'s exit code, its output flushed; EXIT_BROKEN_PIPE without a word when stdout's
    reader has gone. stdout is then pointed at /dev/null, so that the interpreter's own flush at
    exit does not fail again (Python's documented recipe, library/signal.html)."""
    try:
        code = command()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code
