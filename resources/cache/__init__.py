"""The embedding cache: in-process LRU -> Redis (optional, shared) -> local disk (SQLite).

This package owns every byte the pipeline caches for an embedding. Keys always come from
``embedding_assets.core.identity.embedding_cache_key``; nothing here builds one. One module per
concern:

- ``codec``: the value format (float32 vector + checksum or HMAC over key and value; never pickle);
- ``urls``: masking and checking Redis URLs;
- ``lru``, ``redis_tier``, ``disk``: the three tiers (a damaged disk file is moved aside and
  recreated);
- ``resource``: ``EmbeddingCacheResource``, which puts them together and validates every value it
  serves.
"""

from resources.cache.codec import Verdict, check_value, decode_vector, encode_vector
from resources.cache.errors import (
    EmbeddingCacheConfigError,
    EmbeddingCacheError,
    EmbeddingCacheStorageError,
    EmbeddingCacheValueError,
)
from resources.cache.resource import DISK_CACHE_RELATIVE_PATH, SHARED_TIERS, CacheHit, EmbeddingCacheResource
from resources.cache.urls import mask_redis_url

__all__ = [
    "DISK_CACHE_RELATIVE_PATH",
    "SHARED_TIERS",
    "CacheHit",
    "EmbeddingCacheConfigError",
    "EmbeddingCacheError",
    "EmbeddingCacheResource",
    "EmbeddingCacheStorageError",
    "EmbeddingCacheValueError",
    "Verdict",
    "check_value",
    "decode_vector",
    "encode_vector",
    "mask_redis_url",
]
