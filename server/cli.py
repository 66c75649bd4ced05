"""``mnist-serve``: parse settings, configure logging, run the server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server.settings import load_settings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValueError as exc:
        print(f"mnist-serve: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.workers > 1:
        from server.workers import run_workers

        return run_workers(settings)
    from server.app import serve  # TensorFlow and grpc load after the flags are known to be good

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
