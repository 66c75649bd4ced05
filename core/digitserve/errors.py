"""The model repository's errors, below ``digitserve.repository`` and ``digitserve.metadata``, which
raise them (``digitserve.repository`` exports them too)."""

from __future__ import annotations


class RepositoryError(Exception):
    """Base class of the model repository's errors."""


class ModelNotFoundError(RepositoryError):
    """Raised when a model name, or a version of it, does not exist in the repository."""


class CorruptVersionError(RepositoryError):
    """Raised when a published version is unreadable: bad metadata, or a file whose checksum
    differs from the one recorded in its metadata."""
