"""API keys: ``Authorization: Bearer <key>`` checked against ``EMBEDDING_API_KEYS`` in constant time.

Both sides are hashed with sha256 before ``hmac.compare_digest``, so neither a key's characters nor its
length show in the timing, and every configured key is compared (no early exit). Keys are never logged,
echoed in an error or shown by ``repr``. With no keys configured the service is open (bind it to loopback).
"""

from __future__ import annotations

import hashlib
import hmac

from embedding_assets.service.api import ApiError


class ApiKeys:
    """The configured keys as digests; ``check(header)`` raises a 401 ApiError unless one matches."""

    def __init__(self, keys: tuple[str, ...] | list[str]):
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"

    def check(self, authorization: str | None) -> None:
        if not self._digests:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "an API key is required: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="missing_api_key")
        offered = hashlib.sha256(token.strip().encode("utf-8")).digest()
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(offered, digest)
        if not matched:
            raise ApiError(401, "the API key is not valid", type="authentication_error", code="invalid_api_key")
