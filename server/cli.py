"""``mnist-serve``: parse settings, configure logging, run the server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server.settings import load_settings


def configure_logging(level: str, log_format: str = "auto") -> None:
    """Root logging to stderr: JSON lines, or text (``auto``: text on a terminal, else JSON)."""
    from server.logs import JsonFormatter, access_log, resolve_format, text_formatter

    is_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    handler = logging.StreamHandler(sys.stderr)
    json_lines = resolve_format(log_format, is_terminal) == "json"
    handler.setFormatter(JsonFormatter() if json_lines else text_formatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    access_log.direct(sys.stderr, json_lines)  # the same lines, written in batches


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValueError as exc:
        print(f"mnist-serve: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from server.workers import run_workers

        return run_workers(settings)
    from server.app import serve  # TensorFlow and grpc load after the flags are known to be good

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
