"""The embedding cache: in-process LRU -> Redis (optional, shared) -> local disk (SQLite).

This module owns every byte the pipeline caches for an embedding. Keys always come from
``embedding_assets.core.identity.embedding_cache_key``; this module never builds one.

Tiers, fastest first:

- **LRU** (in process): shared by every ``EmbeddingCacheResource`` with the same settings in
  this process, because Dagster builds a fresh resource object for each step.
- **Redis** (optional, shared between machines): never required. Any Redis failure marks the
  tier *degraded*, logs one warning per outage (password masked), and the cache keeps serving
  from LRU + disk; Redis is tried again after ``redis_retry_seconds``.
- **Disk** (embedded default): ``{home}/cache/embeddings.sqlite`` in WAL mode with a busy
  timeout, so several processes read and write it safely.

Values are ``encode_vector`` bytes (a 12-byte header, then raw little-endian float32), never
pickle: a cache shared over the network must not be able to run code in the reader. A value
whose header or length does not match what the caller asked for is a miss (counted as
``corrupt``) and is overwritten by the next write of that key.

Runtime state (clients, connections, LRU) lives in a module-level registry keyed by process
id and settings, never in the resource's fields, so the resource pickles and can be sent to
worker processes (each process builds its own clients on first use).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import dagster as dg
import numpy as np
import redis
from pydantic import Field, PrivateAttr, model_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

# Not exported by dagster; needed to read an int field bound with dg.EnvVar.int outside a run.
from dagster._config.field_utils import IntEnvVar

logger = logging.getLogger("embedding_pipeline.cache")

DISK_CACHE_RELATIVE_PATH = Path("cache") / "embeddings.sqlite"

# Header: magic, dtype code, 3 pad bytes (keeps the float32 payload 4-byte aligned), dim.
_HEADER = struct.Struct("<4sB3xI")
_MAGIC = b"EMB1"
_DTYPE_FLOAT32 = 1
_PAYLOAD_DTYPE = np.dtype("<f4")

_REDIS_SCHEMES = ("redis", "rediss", "unix")
_DISK_BUSY_TIMEOUT_MS = 10_000


class EmbeddingCacheError(Exception):
    """Base of every error the embedding cache raises (Redis problems are never raised)."""


class EmbeddingCacheConfigError(EmbeddingCacheError):
    """A setting of ``EmbeddingCacheResource`` is invalid; the message names the setting."""


class EmbeddingCacheStorageError(EmbeddingCacheError):
    """The disk tier (SQLite file) could not be opened, read or written."""


class EmbeddingCacheValueError(EmbeddingCacheError, ValueError):
    """A vector or a lookup argument handed to the cache is not something it can store."""


# --------------------------------------------------------------------------- value codec


def encode_vector(vector: np.ndarray) -> bytes:
    """Serialize one embedding to the cache's value format.

    Args:
        vector: 1-D array of shape ``(dim,)``, ``dim >= 1``, real and finite; cast to float32.

    Returns:
        ``b"EMB1"`` + dtype code (1 = float32) + 3 pad bytes + ``dim`` as little-endian
        uint32, followed by ``dim`` little-endian float32 values (``12 + 4 * dim`` bytes).

    Raises:
        EmbeddingCacheValueError: the array is not 1-D, is empty, is not real-valued, or holds
            NaN/inf (caching those would hand the same bad vector to every later run).
    """
    array = np.asarray(vector)
    if array.ndim != 1 or array.shape[0] == 0:
        raise EmbeddingCacheValueError(
            f"cannot cache an embedding of shape {array.shape}: expected a non-empty 1-D vector"
        )
    if array.dtype.kind not in "fiub":
        raise EmbeddingCacheValueError(
            f"cannot cache an embedding of dtype {array.dtype}: expected real numbers"
        )
    payload = array.astype(_PAYLOAD_DTYPE, copy=False)
    if not np.isfinite(payload).all():
        raise EmbeddingCacheValueError("cannot cache an embedding that contains NaN or inf")
    return _HEADER.pack(_MAGIC, _DTYPE_FLOAT32, payload.shape[0]) + payload.tobytes()


def decode_vector(value: bytes, dim: int) -> np.ndarray | None:
    """Read one cached value back, or ``None`` when it is not a valid ``dim``-vector.

    Args:
        value: bytes as written by ``encode_vector`` (anything else yields ``None``).
        dim: the dimension the caller's model produces.

    Returns:
        A read-only float32 array of shape ``(dim,)``, or ``None`` when the value is not
        bytes, is too short, has another magic or dtype code, records another dim, or its
        length does not match its header. ``None`` is a cache miss, never an error.
    """
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None
    value = bytes(value)
    if len(value) < _HEADER.size:
        return None
    magic, dtype_code, stored_dim = _HEADER.unpack_from(value)
    if magic != _MAGIC or dtype_code != _DTYPE_FLOAT32 or stored_dim != dim:
        return None
    if len(value) != _HEADER.size + _PAYLOAD_DTYPE.itemsize * dim:
        return None
    vector = np.frombuffer(value, dtype=_PAYLOAD_DTYPE, offset=_HEADER.size, count=dim)
    return vector.astype(np.float32, copy=False)


def _payload_view(value: bytes) -> np.ndarray:
    """Read-only float32 view of the payload of a value ``encode_vector`` just produced."""
    return np.frombuffer(value, dtype=_PAYLOAD_DTYPE, offset=_HEADER.size).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- URL helpers


def mask_redis_url(url: str | None) -> str | None:
    """The URL with its password (and a ``password=`` query value) replaced by ``***``.

    A lone user-info part (``redis://secret@host``) is masked too: people often put a
    password there by mistake. A URL that cannot be parsed is returned as a placeholder.
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis_url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if has_password else f"***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _url_secrets(url: str | None) -> list[str]:
    """Every spelling of the URL's secrets, to scrub them from error texts."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    secrets = []
    if parts.password:
        secrets += [parts.password, unquote(parts.password)]
    elif parts.username and "@" in parts.netloc:
        secrets += [parts.username, unquote(parts.username)]
    secrets += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def _scrub(text: str, url: str | None) -> str:
    for secret in _url_secrets(url):
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- settings check


def _settings_problems(settings: Mapping[str, Any]) -> list[str]:
    """Human-readable problems with the given settings (only the keys present are checked)."""
    problems = []
    if "home" in settings and not str(settings["home"]).strip():
        problems.append("home must be a non-empty folder path")
    if "lru_entries" in settings and settings["lru_entries"] < 0:
        problems.append(f"lru_entries must be >= 0 (0 disables the LRU), got {settings['lru_entries']}")
    if "redis_timeout_ms" in settings and settings["redis_timeout_ms"] <= 0:
        problems.append(f"redis_timeout_ms must be > 0, got {settings['redis_timeout_ms']}")
    if "redis_retry_seconds" in settings and settings["redis_retry_seconds"] < 0:
        problems.append(f"redis_retry_seconds must be >= 0, got {settings['redis_retry_seconds']}")
    ttl = settings.get("redis_ttl_seconds")
    if ttl is not None and ttl <= 0:
        problems.append(f"redis_ttl_seconds must be > 0 or unset (no expiry), got {ttl}")
    url = settings.get("redis_url")
    if url:
        problems += _redis_url_problems(url)
    return problems


def _redis_url_problems(url: str) -> list[str]:
    masked = mask_redis_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        return [f"redis_url {masked} cannot be parsed: {_scrub(str(exc), url)}"]
    if parts.scheme not in _REDIS_SCHEMES:
        return [
            f"redis_url {masked} has scheme {parts.scheme!r}; expected redis://, rediss:// (TLS) "
            "or unix://"
        ]
    if parts.scheme == "unix":
        return [] if parts.path else [f"redis_url {masked} names no socket path"]
    if not parts.hostname:
        return [f"redis_url {masked} names no host"]
    db = unquote(parts.path).strip("/")
    if db and not db.isdigit():
        return [f"redis_url {masked} has database {db!r}; expected a number such as /0"]
    del port
    try:
        redis.connection.parse_url(url)  # the client's own parser: query options such as ?ssl_cert_reqs=
    except ValueError as exc:
        return [f"redis_url {masked} is rejected by the Redis client: {_scrub(str(exc), url)}"]
    return []


def _raise_on_problems(problems: list[str]) -> None:
    if problems:
        raise EmbeddingCacheConfigError("invalid EmbeddingCacheResource settings: " + "; ".join(problems))


# --------------------------------------------------------------------------- process tiers


class _LruTier:
    """Thread-safe LRU of read-only vectors, bounded by entry count (0 = disabled)."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            vector = self._entries.get(key)
            if vector is not None:
                self._entries.move_to_end(key)
            return vector

    def put_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        if self._capacity == 0:
            return
        with self._lock:
            for key, vector in items:
                self._entries[key] = vector
                self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class _RedisTier:
    """A lazily built Redis client plus the health state that decides whether to use it."""

    def __init__(self, url: str, timeout_s: float, retry_s: float, ttl_s: int | None):
        self.url = url
        self.masked_url = mask_redis_url(url)
        self.ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self.status = "ok"
        self._retry_at = 0.0

    def client(self) -> redis.Redis | None:
        """The client to call now, or None while degraded and the retry time has not come."""
        with self._lock:
            if self.status == "degraded" and time.monotonic() < self._retry_at:
                return None
            if self._client is None:
                # No retries: a retry would multiply the time bound the user set; the next
                # call after redis_retry_seconds is the retry.
                self._client = redis.Redis.from_url(
                    self.url,
                    socket_timeout=self._timeout_s,
                    socket_connect_timeout=self._timeout_s,
                    retry=Retry(NoBackoff(), 0),
                    retry_on_timeout=False,
                    health_check_interval=0,
                )
            return self._client

    def record_failure(self, exc: BaseException) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + self._retry_s
            stale, self._client = self._client, None
            if self.status != "degraded":
                self.status = "degraded"
                logger.warning(
                    "Redis embedding cache at %s is unavailable (%s: %s); serving from the "
                    "in-process LRU and disk, retrying in %.1f s",
                    self.masked_url,
                    type(exc).__name__,
                    _scrub(str(exc), self.url),
                    self._retry_s,
                )
        if stale is not None:
            # Drop every pooled socket: after an outage they are dead or mid-reply.
            try:
                stale.close()
            except Exception:  # closing a broken client must never raise out of the cache
                pass

    def record_success(self) -> None:
        if self.status == "ok":
            return
        with self._lock:
            if self.status == "degraded":
                self.status = "ok"
                logger.info("Redis embedding cache at %s answers again; using it", self.masked_url)

    def close(self) -> None:
        with self._lock:
            stale, self._client = self._client, None
        if stale is not None:
            stale.close()


class _DiskTier:
    """One SQLite file shared by processes; one connection per process, used under a lock."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self.path,
                    timeout=_DISK_BUSY_TIMEOUT_MS / 1000,
                    isolation_level=None,  # explicit BEGIN IMMEDIATE below
                    check_same_thread=False,  # guarded by self._lock
                )
                # busy_timeout first, so that racing processes wait instead of failing below.
                conn.execute(f"PRAGMA busy_timeout = {_DISK_BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL: a power cut may lose the last writes, which a cache can afford.
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, value BLOB)"
                )
            except (sqlite3.Error, OSError) as exc:
                raise EmbeddingCacheStorageError(
                    f"cannot open the disk cache {self.path}: {exc}"
                ) from exc
            self._conn = conn
        return self._conn

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        with self._lock:
            conn = self._connection()
            batch = max(1, min(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 30_000))
            try:
                for start in range(0, len(keys), batch):
                    part = keys[start : start + batch]
                    placeholders = ",".join("?" * len(part))
                    rows = conn.execute(
                        f"SELECT key, value FROM embeddings WHERE key IN ({placeholders})", part
                    )
                    found.update(rows)
            except sqlite3.Error as exc:
                raise EmbeddingCacheStorageError(f"cannot read the disk cache {self.path}: {exc}") from exc
        return found

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("INSERT OR REPLACE INTO embeddings (key, value) VALUES (?, ?)", items)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise EmbeddingCacheStorageError(f"cannot write the disk cache {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _ProcessTiers:
    """Everything one process keeps for one cache configuration."""

    def __init__(self, settings: Mapping[str, Any]):
        self.lru = _LruTier(settings["lru_entries"])
        self.redis = (
            _RedisTier(
                settings["redis_url"],
                timeout_s=settings["redis_timeout_ms"] / 1000,
                retry_s=settings["redis_retry_seconds"],
                ttl_s=settings["redis_ttl_seconds"],
            )
            if settings["redis_url"]
            else None
        )
        home = Path(settings["home"]).expanduser()
        self.disk = _DiskTier(home / DISK_CACHE_RELATIVE_PATH) if settings["disk_enabled"] else None

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        if self.disk is not None:
            self.disk.close()


_REGISTRY: dict[tuple, _ProcessTiers] = {}
_REGISTRY_LOCK = threading.Lock()


class _CacheStats:
    """Per-resource counters; picklable (the lock is rebuilt on unpickling)."""

    FIELDS = ("lru_hits", "redis_hits", "disk_hits", "misses", "writes", "corrupt", "redis_errors")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.counts[name] += delta

    def reset(self) -> None:
        with self._lock:
            self.counts = dict.fromkeys(self.FIELDS, 0)

    def __getstate__(self) -> dict:
        return {"counts": dict(self.counts)}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self.counts = state["counts"]


_REDIS_FAILURES = (redis.RedisError, OSError)


# --------------------------------------------------------------------------- the resource


class EmbeddingCacheResource(dg.ConfigurableResource):
    """Embedding cache: in-process LRU -> Redis (optional, shared) -> local disk (SQLite).

    Usable in Dagster (as a resource) or directly:
    ``EmbeddingCacheResource(home=...).get_many(keys, dim)``; tiers are built lazily in the
    process that first uses them. Redis problems never raise: they degrade to LRU + disk.
    """

    home: str = Field(description="Pipeline home folder; the disk tier is {home}/cache/embeddings.sqlite.")
    redis_url: str | None = Field(
        default=None,
        description=(
            "Redis URL, e.g. redis://127.0.0.1:6379/0, rediss:// for TLS, "
            "redis://:password@host:6379/0 (bind with dg.EnvVar for secrets). Unset or empty: no Redis tier."
        ),
    )
    lru_entries: int = Field(
        default=50_000, description="Vectors kept in the in-process LRU (shared per process); 0 disables it."
    )
    redis_timeout_ms: int = Field(
        default=200, description="Upper bound of every Redis call (connect and socket timeout), in ms."
    )
    redis_retry_seconds: float = Field(
        default=30.0, description="After a Redis failure, skip Redis for this many seconds, then try again."
    )
    redis_ttl_seconds: int | None = Field(
        default=None, description="Expiry of vectors written to Redis, in seconds; unset means no expiry."
    )
    disk_enabled: bool = Field(default=True, description="Keep the SQLite disk tier under {home}/cache.")

    _stats: _CacheStats = PrivateAttr(default_factory=_CacheStats)

    @model_validator(mode="before")
    @classmethod
    def _check_plain_settings(cls, data: Any) -> Any:
        # Values bound with dg.EnvVar are subclasses of str/int holding the variable's *name*
        # here; they are checked once resolved (setup_for_execution or first use).
        # Values of the wrong type are left to pydantic's own type errors.
        if isinstance(data, Mapping):
            plain = {
                name: value
                for name, value in data.items()
                if value is None
                or (name in ("home", "redis_url") and type(value) is str)
                or (name not in ("home", "redis_url") and type(value) in (int, float))
            }
            _raise_on_problems(_settings_problems(plain))
        return data

    # ----------------------------------------------------------------- lifecycle

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Check the resolved settings, open the tiers, and probe Redis once (never raises for Redis)."""
        tiers = self._tiers()
        if tiers.redis is not None:
            self._redis_call(tiers.redis, lambda client: client.ping())

    def close(self) -> None:
        """Drop this process's tiers for these settings (LRU contents, Redis pool, SQLite
        connection). Other resources with the same settings share them; the next call rebuilds.
        """
        key = self._registry_key()
        with _REGISTRY_LOCK:
            tiers = _REGISTRY.pop(key, None)
        if tiers is not None:
            tiers.close()

    # ----------------------------------------------------------------- public API

    def get_many(self, keys: Sequence[str], dim: int) -> list[np.ndarray | None]:
        """Look embeddings up, fastest tier first, and back-fill faster tiers with hits.

        Args:
            keys: cache keys from ``identity.embedding_cache_key`` (repeats allowed).
            dim: the dimension every returned vector must have; stored values of another
                dimension are misses.

        Returns:
            One entry per key, in order: a read-only float32 array of shape ``(dim,)``, or
            ``None`` on a miss. Copy a vector before modifying it.

        Raises:
            EmbeddingCacheValueError: ``keys`` is a single string, or ``dim`` < 1.
            EmbeddingCacheStorageError: the disk tier cannot be read. Redis never raises.
        """
        if isinstance(keys, (str, bytes)):
            raise EmbeddingCacheValueError("get_many takes a sequence of keys, got a single string")
        if int(dim) < 1:
            raise EmbeddingCacheValueError(f"get_many needs dim >= 1, got {dim}")
        dim = int(dim)
        tiers = self._tiers()
        wanted = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        corrupt = 0

        for key in wanted:
            vector = tiers.lru.get(key)
            if vector is not None and vector.shape == (dim,):
                found[key] = vector
        lru_hits = len(found)

        redis_hits: list[tuple[str, np.ndarray]] = []
        missing = [k for k in wanted if k not in found]
        if missing and tiers.redis is not None:
            values = self._redis_call(tiers.redis, lambda client: client.mget(missing))
            for key, value in zip(missing, values or ()):
                if value is None:
                    continue
                vector = decode_vector(value, dim)
                if vector is None:
                    corrupt += 1
                    continue
                redis_hits.append((key, vector))
            found.update(redis_hits)
            tiers.lru.put_many(redis_hits)

        disk_hits: list[tuple[str, np.ndarray]] = []
        missing = [k for k in wanted if k not in found]
        if missing and tiers.disk is not None:
            for key, value in tiers.disk.get_many(missing).items():
                vector = decode_vector(value, dim)
                if vector is None:
                    corrupt += 1
                    continue
                disk_hits.append((key, vector))
            found.update(disk_hits)
            tiers.lru.put_many(disk_hits)
            if disk_hits and tiers.redis is not None:
                self._redis_set(tiers.redis, [(k, encode_vector(v)) for k, v in disk_hits])

        self._stats.add(
            lru_hits=lru_hits,
            redis_hits=len(redis_hits),
            disk_hits=len(disk_hits),
            misses=len(wanted) - len(found),
            corrupt=corrupt,
        )
        return [found.get(key) for key in keys]

    def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Write embeddings to every tier: LRU, one Redis pipeline, one disk transaction.

        Args:
            items: ``(cache key, vector of shape (dim,))`` pairs; later pairs win on repeats.

        Raises:
            EmbeddingCacheValueError: a vector is not a finite non-empty 1-D array (nothing
                is written then).
            EmbeddingCacheStorageError: the disk tier cannot be written. Redis never raises.
        """
        encoded = {key: encode_vector(vector) for key, vector in items}
        if not encoded:
            return
        tiers = self._tiers()
        pairs = list(encoded.items())
        # The LRU keeps read-only views of the encoded bytes: one copy, immune to the caller
        # modifying its arrays afterwards.
        tiers.lru.put_many([(key, _payload_view(value)) for key, value in pairs])
        if tiers.redis is not None:
            self._redis_set(tiers.redis, pairs)
        if tiers.disk is not None:
            tiers.disk.set_many(pairs)
        self._stats.add(writes=len(pairs))

    def stats(self) -> dict:
        """Counters of this resource object since creation or ``reset_stats()``.

        Keys: ``lru_hits``, ``redis_hits``, ``disk_hits``, ``misses`` (per distinct key per
        ``get_many`` call), ``writes`` (vectors given to ``set_many``), ``corrupt`` (stored
        values that failed to decode), ``redis_errors`` (failed Redis calls), ``redis_status``
        (``"ok"``, ``"degraded"`` or ``"disabled"``, shared by the process), ``lru_size``,
        and ``hits``: the three hit counts again as ``{"lru": n, "redis": n, "disk": n}``.
        """
        tiers = self._tiers()
        counts: dict[str, Any] = dict(self._stats.counts)
        counts["hits"] = {tier: counts[f"{tier}_hits"] for tier in ("lru", "redis", "disk")}
        counts["redis_status"] = "disabled" if tiers.redis is None else tiers.redis.status
        counts["lru_size"] = len(tiers.lru)
        return counts

    def reset_stats(self) -> None:
        """Zero this resource object's counters."""
        self._stats.reset()

    def masked_redis_url(self) -> str | None:
        """The effective ``redis_url`` with the password replaced by ``***`` (safe to log)."""
        return mask_redis_url(self._settings()["redis_url"])

    @property
    def disk_path(self) -> Path:
        """Where the disk tier lives: ``{home}/cache/embeddings.sqlite``."""
        return Path(self._settings()["home"]) / DISK_CACHE_RELATIVE_PATH

    def __reduce__(self):
        # Rebuild from the settings alone: Dagster's internal state on the object does not
        # unpickle, and runtime tiers belong to the process that built them. Counters restart.
        settings = {name: getattr(self, name) for name in type(self).model_fields}
        return (_rebuild_resource, (type(self), settings))

    # ----------------------------------------------------------------- internals

    def _settings(self) -> dict[str, Any]:
        """The effective settings; dg.EnvVar fields are read from the environment here, which
        Dagster has already done inside a run but nobody does for direct use."""
        settings = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, (dg.EnvVar, IntEnvVar)):
                resolved = value.get_value()
                if resolved is None:
                    raise EmbeddingCacheConfigError(
                        f"invalid EmbeddingCacheResource settings: {name} is bound to environment "
                        f"variable {value.env_var_name}, which is not set"
                    )
                value = resolved
            settings[name] = value
        settings["home"] = str(Path(settings["home"]).expanduser().absolute())
        settings["redis_url"] = settings["redis_url"] or None
        return settings

    def _registry_key(self) -> tuple:
        # The pid keeps a forked child from using its parent's sockets and SQLite handle.
        return (os.getpid(), *sorted(self._settings().items()))

    def _tiers(self) -> _ProcessTiers:
        key = self._registry_key()
        tiers = _REGISTRY.get(key)
        if tiers is None:
            with _REGISTRY_LOCK:
                tiers = _REGISTRY.get(key)
                if tiers is None:
                    settings = self._settings()
                    _raise_on_problems(_settings_problems(settings))
                    tiers = _REGISTRY[key] = _ProcessTiers(settings)
        return tiers

    def _redis_call(self, tier: _RedisTier, call):
        """Run one Redis round trip; on any failure mark the tier degraded and return None."""
        try:
            client = tier.client()
            if client is None:
                return None
            result = call(client)
        except _REDIS_FAILURES as exc:
            self._stats.add(redis_errors=1)
            tier.record_failure(exc)
            return None
        tier.record_success()
        return result

    def _redis_set(self, tier: _RedisTier, pairs: Sequence[tuple[str, bytes]]) -> None:
        def write(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for key, value in pairs:
                pipe.set(key, value, ex=tier.ttl_s)
            pipe.execute()

        self._redis_call(tier, write)


def _rebuild_resource(cls: type[EmbeddingCacheResource], settings: dict[str, Any]) -> EmbeddingCacheResource:
    """Unpickling entry point of ``EmbeddingCacheResource`` (see ``__reduce__``)."""
    return cls(**settings)
