"""Service settings: every limit and knob with a default and an ``EMBEDDING_*`` variable.

Read once at start-up (``ServiceSettings.from_env``); the model, cache and index store come from
``embedding_assets.settings`` like the pipeline's, so the service and the pipeline share the cache key,
the tiers and the index home.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from embedding_assets.settings import SettingError, load_settings


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and batching of one service process. Invariants are checked in ``__post_init__``."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)  # never printed: repr hides them
    max_inputs: int = 256  # texts per /v1/embeddings request (413 above)
    max_input_chars: int = 20_000  # characters per text or query (413 above)
    max_body_bytes: int = 8 * 1024 * 1024  # request body (413 above)
    max_k: int = 100  # hits per search (422 above)
    batch_wait_ms: float = 3.0  # how long a batch waits for requests already being tokenized
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
        """From the ``EMBEDDING_*`` settings (``embedding_assets.settings.Settings``, service section):
        ``EMBEDDING_API_KEYS`` (comma-separated; unset = no auth), ``EMBEDDING_MAX_INPUTS`` and the other
        limits. Raises SettingError naming the variable."""
        s = load_settings()
        raw_keys = s.api_keys.get_secret_value() if s.api_keys is not None else ""
        return cls(
            api_keys=tuple(k.strip() for k in raw_keys.split(",") if k.strip()),
            max_inputs=s.max_inputs, max_input_chars=s.max_input_chars, max_body_bytes=s.max_body_bytes,
            max_k=s.max_k, batch_wait_ms=s.batch_wait_ms, batch_tokens=s.batch_tokens,
            cache_writes=s.service_cache_writes, index_poll_seconds=s.index_poll_seconds,
        )
