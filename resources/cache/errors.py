"""The one exception family of the embedding cache (Redis problems are never raised)."""

from __future__ import annotations


class EmbeddingCacheError(Exception):
    """Base of every error the embedding cache raises (Redis problems are never raised)."""


class EmbeddingCacheConfigError(EmbeddingCacheError):
    """A setting of ``EmbeddingCacheResource`` is invalid; the message names the setting."""


class EmbeddingCacheStorageError(EmbeddingCacheError):
    """The disk tier (SQLite file) could not be opened, read or written (a corrupt file is not
    this error: it is moved aside and recreated)."""


class EmbeddingCacheValueError(EmbeddingCacheError, ValueError):
    """A vector or a lookup argument handed to the cache is not something it can store."""
