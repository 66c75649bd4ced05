"""``mnist-serve``: parse settings, configure logging, run the server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server.settings import load_settings


def configure_logging(level: str, log_format: str = "auto", native_stderr: bool = True) -> None:
    """Root logging to stderr: JSON lines, or text (``auto``: text on a terminal, else JSON). In
    JSON mode with ``native_stderr`` (a process that serves), what native code writes to stderr
    (grpc core, TensorFlow) becomes JSON lines too (``bridge_native_stderr``). grpc's own Python
    records are cut to one line and rate-limited (``GrpcRecordFilter``)."""
    from server.logs import (
        GrpcRecordFilter,
        JsonFormatter,
        access_log,
        bridge_native_stderr,
        resolve_format,
        text_formatter,
    )

    is_terminal = bool(getattr(sys.stderr, "isatty", lambda: False)())
    json_lines = resolve_format(log_format, is_terminal) == "json"
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.DEBUG)
    stream = (bridge_native_stderr(threshold) if json_lines and native_stderr else None) or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else text_formatter())
    handler.addFilter(GrpcRecordFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
    access_log.direct(stream, json_lines)  # the same lines, written in batches


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValueError as exc:
        print(f"mnist-serve: error: {exc}", file=sys.stderr)
        return 2
    # The parent of --workers serves nothing: each worker bridges its own native stderr.
    configure_logging(settings.log_level, settings.log_format, native_stderr=settings.workers == 1)
    if settings.workers > 1:
        from server.workers import run_workers

        return run_workers(settings)
    from server.app import serve  # TensorFlow and grpc load after the flags are known to be good

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
