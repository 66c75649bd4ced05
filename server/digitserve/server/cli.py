"""``mnist-serve``: parse settings, configure logging, run the server. It needs the ``serve``
extra; TensorFlow (the ``server`` extra) only for ``--inference tensorflow`` and for versions that
LiteRT cannot serve, which a server without it refuses (``digitserve.inference.loading``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from digitserve.extras import WITH_TENSORFLOW, available, requirement_error

PROG = "mnist-serve"
HELP_FLAGS = {"-h", "--help"}


def _help_without_extra() -> int:
    """``mnist-serve --help`` in an install without the ``serve`` extra (the client's): the help
    (its parser needs only pydantic, a dependency of every install) and the line that says how to
    install the server, exit 0 as a help does."""
    if available("pydantic"):
        from digitserve.server.settings import build_parser

        build_parser(os.environ).print_help()
    print(requirement_error(PROG, "serve", "serving", kind="note"), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    unmet = requirement_error(PROG, "serve", PROG)  # before anything imports what it names
    if unmet:
        if HELP_FLAGS & set(sys.argv[1:] if argv is None else argv):
            return _help_without_extra()
        print(unmet, file=sys.stderr)
        return 2
    from digitserve.server.logs import configure_logging
    from digitserve.server.settings import load_settings

    try:
        settings = load_settings(argv)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if settings.inference == "tensorflow" and not available("tensorflow"):
        print(f"{PROG}: error: --inference tensorflow needs TensorFlow, which is not installed here: "
              f"serve with --inference auto (LiteRT), or run mnist-serve in {WITH_TENSORFLOW}",
              file=sys.stderr)
        return 2
    from digitserve.server.eventloop import EventLoopError, chosen

    try:  # once here, not once per worker
        chosen(settings.event_loop)
    except EventLoopError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    # The parent of --workers serves nothing: each worker bridges its own native stderr.
    configure_logging(settings.log_level, settings.log_format, native_stderr=settings.workers == 1,
                      access=settings.access_log)
    if settings.workers > 1:
        from digitserve.server.security import SecurityConfigError, ServerSecurity
        from digitserve.server.workers import run_workers

        try:  # once here, so a bad certificate or token file is one line, not one per worker
            ServerSecurity.from_settings(settings)
        except SecurityConfigError as error:
            logging.getLogger("digitserve.server.app").error("cannot start: %s", error)
            return 1
        return run_workers(settings)
    from digitserve.server.app import run_process  # TensorFlow and grpc load after the flags are good

    return run_process(settings)


if __name__ == "__main__":
    sys.exit(main())
