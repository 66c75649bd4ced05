"""``mnist-serve``: parse settings, configure logging, run the server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server.logs import configure_logging
from server.settings import load_settings

__all__ = ["configure_logging", "main"]  # configure_logging lives in server.logs (workers import it too)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValueError as exc:
        print(f"mnist-serve: error: {exc}", file=sys.stderr)
        return 2
    # The parent of --workers serves nothing: each worker bridges its own native stderr.
    configure_logging(settings.log_level, settings.log_format, native_stderr=settings.workers == 1)
    if settings.workers > 1:
        from server.security import SecurityConfigError, ServerSecurity
        from server.workers import run_workers

        try:  # once here, so a bad certificate or token file is one line, not one per worker
            ServerSecurity.from_settings(settings)
        except SecurityConfigError as error:
            logging.getLogger("server.app").error("cannot start: %s", error)
            return 1
        return run_workers(settings)
    from server.app import serve  # TensorFlow and grpc load after the flags are known to be good

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
