"""``EmbeddingCacheResource``: the three tiers behind one lookup, with the shared tier as a trust boundary.

Lookups go LRU -> Redis -> disk and back-fill the faster tiers with hits; writes go to every tier.
Every stored value is checked before it is served (``codec.check_value``): bound to its key by a
checksum, or by an HMAC when ``secret`` is set, finite, of the caller's dimension and, when the
caller asks, of unit norm; anything else is a miss, counted, and overwritten by the next write.

A value can verify and still be wrong (a writer with the secret and a broken model, or a vector of
another text written with the right tag by anyone when there is no secret). The embeddings stage
therefore re-embeds a sample of the hits that came from Redis (``audit_rate``) and, on a mismatch,
calls ``distrust("redis")``: this resource object then reads nothing from Redis (and drops what
Redis put in the process LRU) until it is rebuilt, that is for the rest of the run. It still
writes to Redis, which overwrites the bad values it re-embedded.

Runtime state (clients, connections, LRU) lives in a module-level registry keyed by process id and
settings, never in the resource's fields, so the resource pickles and can be sent to worker
processes (each process builds its own clients on first use).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import redis
from pydantic import Field, PrivateAttr, model_validator

from embedding_assets.core.vector_checks import invalid_rows
from resources.cache.codec import Verdict, check_value, encode_vector, payload_view
from resources.cache.disk import DiskTier
from resources.cache.errors import EmbeddingCacheConfigError, EmbeddingCacheValueError
from resources.cache.lru import LruTier
from resources.cache.redis_tier import REDIS_FAILURES, RedisTier
from resources.cache.urls import mask_redis_url, redis_url_problems

logger = logging.getLogger("embedding_pipeline.cache")

DISK_CACHE_RELATIVE_PATH = Path("cache") / "embeddings.sqlite"
MIN_SECRET_CHARS = 16
SHARED_TIERS = ("redis",)
"""Tiers other machines write. The disk tier is not one: it sits under ``home`` beside the
warehouse, so whoever can write it can write the warehouse directly."""

# Settings that do not change what the process tiers hold (kept out of the registry key).
_NOT_TIER_SETTINGS = ("audit_rate",)


@dataclass(frozen=True)
class CacheHit:
    """One served vector: where it was found (``tier``) and who wrote it (``origin``: ``"redis"``
    for values read from Redis, also when later found in the LRU; ``"local"`` otherwise)."""

    vector: np.ndarray
    tier: str
    origin: str

    @property
    def shared(self) -> bool:
        """Whether another machine may have written this value (it is then subject to the audit)."""
        return self.origin in SHARED_TIERS


# --------------------------------------------------------------------------- settings check


def settings_problems(settings: Mapping[str, Any]) -> list[str]:
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
    if "audit_rate" in settings and not 0 <= settings["audit_rate"] <= 1:
        problems.append(
            f"audit_rate (EMBEDDING_CACHE_AUDIT_RATE) must be in [0, 1] (0 turns the audit off), got {settings['audit_rate']}"
        )
    secret = settings.get("secret")
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        # Never echo the value: it is a secret even when it is a bad one.
        problems.append(
            f"secret (EMBEDDING_CACHE_SECRET) must be at least {MIN_SECRET_CHARS} characters, got {len(secret)}; "
            "use e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    url = settings.get("redis_url")
    if url:
        problems += redis_url_problems(url)
    return problems


def _raise_on_problems(problems: list[str]) -> None:
    if problems:
        raise EmbeddingCacheConfigError("invalid EmbeddingCacheResource settings: " + "; ".join(problems))


# --------------------------------------------------------------------------- process state


class _ProcessTiers:
    """Everything one process keeps for one cache configuration."""

    def __init__(self, settings: Mapping[str, Any]):
        self.lru = LruTier(settings["lru_entries"])
        self.redis = (
            RedisTier(
                settings["redis_url"],
                timeout_s=settings["redis_timeout_ms"] / 1000,
                retry_s=settings["redis_retry_seconds"],
                ttl_s=settings["redis_ttl_seconds"],
            )
            if settings["redis_url"]
            else None
        )
        home = Path(settings["home"]).expanduser()
        self.disk = DiskTier(home / DISK_CACHE_RELATIVE_PATH) if settings["disk_enabled"] else None
        self.secret: bytes | None = settings["secret"].encode("utf-8") if settings["secret"] else None

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        if self.disk is not None:
            self.disk.close()


_REGISTRY: dict[tuple, _ProcessTiers] = {}
_REGISTRY_LOCK = threading.Lock()


class _CacheStats:
    """Per-resource counters; picklable (the lock is rebuilt on unpickling)."""

    FIELDS = (
        "lru_hits", "redis_hits", "disk_hits", "misses", "writes",
        "corrupt", "malformed", "untrusted", "invalid", "redis_errors",
    )  # fmt: skip

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.counts[name] += delta

    def reject(self, verdict: Verdict) -> None:
        self.add(corrupt=1, **{verdict.value: 1})

    def reset(self) -> None:
        with self._lock:
            self.counts = dict.fromkeys(self.FIELDS, 0)

    def __getstate__(self) -> dict:
        return {"counts": dict(self.counts)}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self.counts = state["counts"]


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
    secret: str | None = Field(
        default=None,
        description=(
            "EMBEDDING_CACHE_SECRET: when set, every value is written with an HMAC-SHA256 over key and value "
            "and only values with a valid HMAC are read, so only writers holding it can feed this cache. "
            f"At least {MIN_SECRET_CHARS} characters; bind with dg.EnvVar. Same value on every machine."
        ),
    )
    audit_rate: float = Field(
        default=0.01,
        description=(
            "EMBEDDING_CACHE_AUDIT_RATE: share of Redis hits the embeddings stage re-embeds to check them "
            "(at least one per batch with Redis hits); 0 turns the audit off."
        ),
    )

    _stats: _CacheStats = PrivateAttr(default_factory=_CacheStats)
    _distrusted: set = PrivateAttr(default_factory=set)

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
                or (name in ("home", "redis_url", "secret") and type(value) is str)
                or (name not in ("home", "redis_url", "secret") and type(value) in (int, float))
            }
            _raise_on_problems(settings_problems(plain))
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

    def get_many(self, keys: Sequence[str], dim: int, *, unit_norm: bool = False) -> list[np.ndarray | None]:
        """The vectors of ``lookup``, without where they came from."""
        return [None if hit is None else hit.vector for hit in self.lookup(keys, dim, unit_norm=unit_norm)]

    def lookup(self, keys: Sequence[str], dim: int, *, unit_norm: bool = False) -> list[CacheHit | None]:
        """Look embeddings up, fastest tier first, and back-fill faster tiers with hits.

        Args:
            keys: cache keys from ``identity.embedding_cache_key`` (repeats allowed).
            dim: the dimension every returned vector must have; stored values of another
                dimension are misses.
            unit_norm: also require ``|v . v - 1| <= 1e-3`` (normalizing models' vectors).

        Returns:
            One entry per key, in order: a ``CacheHit`` whose vector is a read-only float32 array
            of shape ``(dim,)``, or ``None`` on a miss. A stored value that does not verify for
            its key (and this cache's secret) or is not a valid embedding is a miss, counted in
            ``stats()`` (``corrupt`` and one of ``malformed``/``untrusted``/``invalid``); a
            lower tier may still serve the key. Copy a vector before modifying it.

        Raises:
            EmbeddingCacheValueError: ``keys`` is a single string, or ``dim`` < 1.
            EmbeddingCacheStorageError: the disk tier cannot be read (a damaged file is moved
                aside and recreated instead). Redis never raises.
        """
        if isinstance(keys, (str, bytes)):
            raise EmbeddingCacheValueError("get_many takes a sequence of keys, got a single string")
        if int(dim) < 1:
            raise EmbeddingCacheValueError(f"get_many needs dim >= 1, got {dim}")
        dim = int(dim)
        tiers = self._tiers()
        use_redis = tiers.redis is not None and "redis" not in self._distrusted
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CacheHit] = {}

        for key in wanted:
            entry = tiers.lru.get(key)
            if entry is None:
                continue
            vector, origin = entry
            if origin == "redis" and not use_redis:
                continue
            if vector.shape == (dim,) and not invalid_rows(vector[None, :], dim, unit_norm=unit_norm)[0]:
                found[key] = CacheHit(vector, "lru", origin)
        lru_hits = len(found)

        redis_hits: list[tuple[str, np.ndarray]] = []
        missing = [k for k in wanted if k not in found]
        if missing and use_redis:
            values = self._redis_call(tiers.redis, lambda client: client.mget(missing))
            for key, value in zip(missing, values or ()):
                if value is None:
                    continue
                vector, verdict = check_value(value, dim, key, secret=tiers.secret, unit_norm=unit_norm)
                if vector is None:
                    self._stats.reject(verdict)
                    continue
                redis_hits.append((key, vector))
                found[key] = CacheHit(vector, "redis", "redis")
            tiers.lru.put_many(redis_hits, origin="redis")

        disk_hits: list[tuple[str, np.ndarray]] = []
        missing = [k for k in wanted if k not in found]
        if missing and tiers.disk is not None:
            for key, value in tiers.disk.get_many(missing).items():
                vector, verdict = check_value(value, dim, key, secret=tiers.secret, unit_norm=unit_norm)
                if vector is None:
                    self._stats.reject(verdict)
                    continue
                disk_hits.append((key, vector))
                found[key] = CacheHit(vector, "disk", "local")
            tiers.lru.put_many(disk_hits, origin="local")
            if disk_hits and tiers.redis is not None:
                self._redis_set(tiers.redis, [(k, encode_vector(v, k, secret=tiers.secret)) for k, v in disk_hits])

        self._stats.add(
            lru_hits=lru_hits,
            redis_hits=len(redis_hits),
            disk_hits=len(disk_hits),
            misses=len(wanted) - len(found),
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
        tiers = self._tiers()
        encoded = {key: encode_vector(vector, key, secret=tiers.secret) for key, vector in items}
        if not encoded:
            return
        pairs = list(encoded.items())
        # The LRU keeps read-only views of the encoded bytes: one copy, immune to the caller
        # modifying its arrays afterwards.
        tiers.lru.put_many([(key, payload_view(value)) for key, value in pairs], origin="local")
        if tiers.redis is not None:
            self._redis_set(tiers.redis, pairs)
        if tiers.disk is not None:
            tiers.disk.set_many(pairs)
        self._stats.add(writes=len(pairs))

    def distrust(self, tier: str, reason: str) -> None:
        """Stop reading ``tier`` (only ``"redis"`` is shared) through this resource object.

        Drops every vector that tier put in the process LRU, logs one warning (the first time
        per tier and object) and makes ``stats()["redis_status"]`` report ``"distrusted"``.
        Writes still go to the tier, so re-embedded keys overwrite what was wrong there.
        """
        if tier not in SHARED_TIERS:
            raise EmbeddingCacheValueError(f"only a shared tier ({', '.join(SHARED_TIERS)}) can be distrusted, got {tier!r}")
        if tier in self._distrusted:
            return
        self._distrusted.add(tier)
        dropped = self._tiers().lru.drop_origin(tier)
        logger.warning(
            "%s embedding cache at %s served a wrong vector (%s); not reading it for the rest of this run "
            "(%d of its vectors dropped from the in-process LRU); vectors are re-embedded and written back",
            tier.capitalize(),
            self.masked_redis_url(),
            reason,
            dropped,
        )

    def distrusted(self) -> frozenset[str]:
        """The tiers ``distrust`` turned off for this resource object."""
        return frozenset(self._distrusted)

    def stats(self) -> dict:
        """Counters of this resource object since creation or ``reset_stats()``.

        Keys: ``lru_hits``, ``redis_hits``, ``disk_hits``, ``misses`` (per distinct key per
        lookup), ``writes`` (vectors given to ``set_many``), ``corrupt`` (stored values not
        served), split into ``malformed`` (not this format or dimension), ``untrusted`` (checksum
        or HMAC does not verify for the key) and ``invalid`` (NaN, inf or norm), ``redis_errors``
        (failed Redis calls), ``redis_status`` (``"ok"``, ``"degraded"``, ``"distrusted"`` or
        ``"disabled"``), ``lru_size``, ``disk_moved_aside`` (damaged disk files this process moved
        aside), and ``hits``: the three hit counts again as ``{"lru": n, "redis": n, "disk": n}``.
        """
        tiers = self._tiers()
        counts: dict[str, Any] = dict(self._stats.counts)
        counts["hits"] = {tier: counts[f"{tier}_hits"] for tier in ("lru", "redis", "disk")}
        if tiers.redis is None:
            counts["redis_status"] = "disabled"
        else:
            counts["redis_status"] = "distrusted" if "redis" in self._distrusted else tiers.redis.status
        counts["lru_size"] = len(tiers.lru)
        counts["disk_moved_aside"] = [str(p) for p in tiers.disk.moved_aside] if tiers.disk is not None else []
        return counts

    def reset_stats(self) -> None:
        """Zero this resource object's counters."""
        self._stats.reset()

    def masked_redis_url(self) -> str | None:
        """The effective ``redis_url`` with the password replaced by ``***`` (safe to log)."""
        return mask_redis_url(self._settings()["redis_url"])

    def effective_audit_rate(self) -> float:
        """``audit_rate`` as resolved (a float in [0, 1])."""
        return float(self._settings()["audit_rate"])

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
            # dg.EnvVar (str) and dg.EnvVar.int (int) bindings both carry the variable's name and get_value().
            if isinstance(value, dg.EnvVar) or hasattr(value, "env_var_name"):
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
        settings["secret"] = settings["secret"] or None
        return settings

    def _registry_key(self) -> tuple:
        # The pid keeps a forked child from using its parent's sockets and SQLite handle.
        settings = self._settings()
        return (os.getpid(), *sorted((k, v) for k, v in settings.items() if k not in _NOT_TIER_SETTINGS))

    def _tiers(self) -> _ProcessTiers:
        key = self._registry_key()
        tiers = _REGISTRY.get(key)
        if tiers is None:
            with _REGISTRY_LOCK:
                tiers = _REGISTRY.get(key)
                if tiers is None:
                    settings = self._settings()
                    _raise_on_problems(settings_problems(settings))
                    tiers = _REGISTRY[key] = _ProcessTiers(settings)
        return tiers

    def _redis_call(self, tier: RedisTier, call):
        """Run one Redis round trip; on any failure mark the tier degraded and return None."""
        try:
            client = tier.client()
            if client is None:
                return None
            result = call(client)
        except REDIS_FAILURES as exc:
            self._stats.add(redis_errors=1)
            tier.record_failure(exc)
            return None
        tier.record_success()
        return result

    def _redis_set(self, tier: RedisTier, pairs: Sequence[tuple[str, bytes]]) -> None:
        def write(client: redis.Redis) -> None:
            pipe = client.pipeline(transaction=False)
            for key, value in pairs:
                pipe.set(key, value, ex=tier.ttl_s)
            pipe.execute()

        self._redis_call(tier, write)


def _rebuild_resource(cls: type[EmbeddingCacheResource], settings: dict[str, Any]) -> EmbeddingCacheResource:
    """Unpickling entry point of ``EmbeddingCacheResource`` (see ``__reduce__``)."""
    return cls(**settings)
