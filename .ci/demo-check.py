"""make demo's checks before anything slow (issue 24): the Python it builds the venv with, and the
port its server will listen on. One line and exit 1 on the first problem; run by the system Python,
so it needs nothing installed."""

from __future__ import annotations

import errno
import os
import socket
import sys

PROG = "make demo"


def port_problem(port: int) -> str | None:
    """Why 127.0.0.1:``port`` cannot be the demo server's, or None. A server that answers there
    would take the demo's predict and evaluate calls; a bind that fails would stop its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return f"port {port} on 127.0.0.1 is in use by another server (an earlier demo's?)"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            why = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
            return f"port {port} on 127.0.0.1 cannot be used: {why}"
    return None


def python_problem(venv_exists: bool) -> str | None:
    """Why this Python cannot build the demo's venv, or None."""
    if sys.version_info < (3, 11):  # noqa: UP036  # the system Python may be older than the floor
        return (f"needs Python 3.11 or newer, {sys.executable} is {sys.version.split()[0]}: "
                "name another with PYTHON=python3.12 make demo")
    if not venv_exists:
        try:
            import ensurepip  # noqa: F401  # python3 -m venv needs it (Debian: the python3-venv package)
            import venv  # noqa: F401
        except ImportError:
            return (f"{sys.executable} has no venv module with pip: install python3-venv "
                    "(apt-get install python3-venv) or name another Python with PYTHON=")
    return None


def main() -> int:
    text = os.environ.get("PORT", "50051")
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        problem: str | None = f"MNIST_PORT={text!r} is not a port number (1-65535)"
    else:
        problem = python_problem(os.path.isdir(os.environ.get("VENV", ".venv"))) or port_problem(int(text))
        if problem and problem.startswith("port "):
            problem += f": stop it, or choose another with MNIST_PORT={int(text) + 1} make demo"
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
