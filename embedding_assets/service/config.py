"""Service settings: every limit and knob with a default and an ``EMBEDDING_*`` variable.

Read once at start-up (``ServiceSettings.from_env``); the model, cache and index store come from
``embedding_assets.settings`` like the pipeline's, so the service and the pipeline share the cache key,
the tiers and the index home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from embedding_assets.settings import SettingError, env_float, env_int


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and batching of one service process. Invariants are checked in ``__post_init__``."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never printed: repr hides them
    max_inputs: int = 256  # texts per /v1/embeddings request (413 above)
    max_input_chars: int = 20_000  # characters per text or query (413 above)
    max_body_bytes: int = 8 * 1024 * 1024  # request body (413 above)
    max_k: int = 100  # hits per search (422 above)
    batch_wait_ms: float = 3.0  # how long the batcher waits for more requests after the first one
    batch_tokens: int = 8192  # most tokens (special tokens included) gathered into one batch
    cache_writes: bool = True  # write texts the model embedded back to every cache tier
    index_poll_seconds: float = 1.0  # how often a newly published index version is looked for

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_input_chars", "max_body_bytes", "max_k", "batch_tokens"):
            if getattr(self, name) < 1:
                raise SettingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_wait_ms <= 100:
            raise SettingError(f"batch_wait_ms (EMBEDDING_BATCH_WAIT_MS) must be in [0, 100], got {self.batch_wait_ms}")
        if not 0.05 <= self.index_poll_seconds <= 60:
            raise SettingError(f"index_poll_seconds must be in [0.05, 60], got {self.index_poll_seconds}")

    @classmethod
    def from_env(cls) -> ServiceSettings:
        """From ``EMBEDDING_API_KEYS`` (comma-separated; unset = no auth), ``EMBEDDING_MAX_INPUTS``,
        ``EMBEDDING_MAX_INPUT_CHARS``, ``EMBEDDING_MAX_BODY_BYTES``, ``EMBEDDING_MAX_K``,
        ``EMBEDDING_BATCH_WAIT_MS``, ``EMBEDDING_BATCH_TOKENS``, ``EMBEDDING_SERVICE_CACHE_WRITES`` (0/1) and
        ``EMBEDDING_INDEX_POLL_SECONDS``. Raises SettingError naming the variable."""
        keys = tuple(k.strip() for k in os.environ.get("EMBEDDING_API_KEYS", "").split(",") if k.strip())
        writes = os.environ.get("EMBEDDING_SERVICE_CACHE_WRITES", "1").strip().lower()
        if writes not in ("", "0", "1", "true", "false", "yes", "no"):
            raise SettingError(f"EMBEDDING_SERVICE_CACHE_WRITES={writes!r} is not 0 or 1")
        return cls(
            api_keys=keys,
            max_inputs=env_int("EMBEDDING_MAX_INPUTS", cls.max_inputs),
            max_input_chars=env_int("EMBEDDING_MAX_INPUT_CHARS", cls.max_input_chars),
            max_body_bytes=env_int("EMBEDDING_MAX_BODY_BYTES", cls.max_body_bytes),
            max_k=env_int("EMBEDDING_MAX_K", cls.max_k),
            batch_wait_ms=env_float("EMBEDDING_BATCH_WAIT_MS", cls.batch_wait_ms),
            batch_tokens=env_int("EMBEDDING_BATCH_TOKENS", cls.batch_tokens),
            cache_writes=writes not in ("0", "false", "no"),
            index_poll_seconds=env_float("EMBEDDING_INDEX_POLL_SECONDS", cls.index_poll_seconds),
        )
