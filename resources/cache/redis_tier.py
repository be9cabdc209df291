"""The shared tier: a lazily built Redis client plus the health state that decides whether to use it.

Redis is never required. Any failure marks the tier *degraded*, logs one warning per outage
(password masked), and the cache keeps serving from LRU + disk; Redis is tried again after
``retry_s``. Every call is bounded by ``timeout_s`` and never retried inside the call.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from resources.cache.urls import mask_redis_url, scrub

logger = logging.getLogger("embedding_pipeline.cache")

REDIS_FAILURES = (redis.RedisError, OSError)


class RedisTier:
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
                    scrub(str(exc), self.url),
                    self._retry_s,
                )
        if stale is not None:
            # Drop every pooled socket: after an outage they are dead or mid-reply.
            try:
                stale.close()
            except Exception:  # noqa: S110 - closing a broken client must never raise out of the cache
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
