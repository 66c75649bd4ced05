"""The trainer's exceptions: one base class, so the CLI can turn any of them into one line."""

from __future__ import annotations

__all__ = ["DataError", "TrainerError"]


class TrainerError(Exception):
    """Base class of the trainer's expected errors; the CLI prints the message and exits 1."""


class DataError(TrainerError):
    """Raised by ``trainer.data.fetch`` when MNIST cannot be obtained or verified (a failed
    download, a checksum that differs, content of the wrong structure)."""
