"""The cache's value format: a float32 vector bound to its key, never pickle.

A value is::

    header  b"EMB2" | dtype u8 (1 = float32) | tag kind u8 | 2 pad bytes | dim u32 (little-endian)
    payload dim little-endian float32 values
    tag     16-byte keyed BLAKE2b checksum (kind 1), or 32-byte HMAC-SHA256 (kind 2)

The tag covers the key, the header and the payload, so a value copied under another key (another
text or another model fingerprint) does not verify. Kind 1 only catches mix-ups and damage: anyone
can compute it. Kind 2 is written and required when the cache has a secret
(``EMBEDDING_CACHE_SECRET``): only writers holding the secret produce values a reader accepts.
A reader accepts exactly one kind (the one its own secret setting writes), so turning a secret on
makes every unauthenticated value a miss, and values of the first format (``EMB1``, no tag) are
misses too; each is overwritten by the next write of its key.

A value that verifies must also be a valid embedding (``core.vector_checks.invalid_rows``): finite,
of the caller's dimension, and, when the caller asks, of unit norm.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from enum import Enum

import numpy as np

from embedding_assets.core.vector_checks import invalid_rows
from resources.cache.errors import EmbeddingCacheValueError

_HEADER = struct.Struct("<4sBB2xI")
_MAGIC = b"EMB2"
_DTYPE_FLOAT32 = 1
_TAG_CHECKSUM = 1
_TAG_HMAC = 2
_TAG_SIZES = {_TAG_CHECKSUM: 16, _TAG_HMAC: 32}
_PAYLOAD_DTYPE = np.dtype("<f4")
_CHECKSUM_PERSON = b"emb-cache-v2"  # domain separation: this checksum is for nothing else


class Verdict(str, Enum):
    """Why a stored value was or was not served."""

    OK = "ok"
    MALFORMED = "malformed"  # not this format, wrong length, or another dimension
    UNTRUSTED = "untrusted"  # tag does not verify for this key (or for this secret)
    INVALID = "invalid"  # verifies, but is not a valid embedding (NaN, inf, norm)


def _message(key: str, header: bytes, payload: bytes) -> bytes:
    encoded = key.encode("utf-8")
    return struct.pack("<I", len(encoded)) + encoded + header + payload


def _tag(kind: int, secret: bytes | None, message: bytes) -> bytes:
    if kind == _TAG_HMAC:
        assert secret is not None  # noqa: S101 - narrows the type; _TAG_HMAC is only chosen with a secret
        return hmac.new(secret, message, hashlib.sha256).digest()
    return hashlib.blake2b(message, digest_size=16, person=_CHECKSUM_PERSON).digest()


def encode_vector(vector: np.ndarray, key: str, *, secret: bytes | None = None) -> bytes:
    """Serialize one embedding for ``key`` (HMAC-tagged with ``secret``, else checksummed).

    Args:
        vector: 1-D array of shape ``(dim,)``, ``dim >= 1``, real and finite; cast to float32.
        key: the cache key the value is stored under (``identity.embedding_cache_key``).
        secret: ``EMBEDDING_CACHE_SECRET`` as bytes, or None.

    Returns:
        ``12 + 4 * dim + 16`` bytes (checksum) or ``12 + 4 * dim + 32`` bytes (HMAC).

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
        raise EmbeddingCacheValueError(f"cannot cache an embedding of dtype {array.dtype}: expected real numbers")
    payload = array.astype(_PAYLOAD_DTYPE, copy=False)
    if not np.isfinite(payload).all():
        raise EmbeddingCacheValueError("cannot cache an embedding that contains NaN or inf")
    kind = _TAG_HMAC if secret else _TAG_CHECKSUM
    header = _HEADER.pack(_MAGIC, _DTYPE_FLOAT32, kind, payload.shape[0])
    body = payload.tobytes()
    return header + body + _tag(kind, secret, _message(key, header, body))


def check_value(
    value: object, dim: int, key: str, *, secret: bytes | None = None, unit_norm: bool = False
) -> tuple[np.ndarray | None, Verdict]:
    """Verify one stored value for ``key``: ``(vector, Verdict.OK)`` or ``(None, why not)``.

    Never raises for any input bytes. The vector is a read-only float32 ``(dim,)`` view.
    """
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return None, Verdict.MALFORMED
    value = bytes(value)
    if len(value) < _HEADER.size:
        return None, Verdict.MALFORMED
    magic, dtype_code, kind, stored_dim = _HEADER.unpack_from(value)
    if magic != _MAGIC or dtype_code != _DTYPE_FLOAT32 or kind not in _TAG_SIZES or stored_dim != dim:
        return None, Verdict.MALFORMED
    end = _HEADER.size + _PAYLOAD_DTYPE.itemsize * dim
    if len(value) != end + _TAG_SIZES[kind]:
        return None, Verdict.MALFORMED
    expected_kind = _TAG_HMAC if secret else _TAG_CHECKSUM
    if kind != expected_kind:
        return None, Verdict.UNTRUSTED
    header, body, tag = value[: _HEADER.size], value[_HEADER.size : end], value[end:]
    if not hmac.compare_digest(tag, _tag(kind, secret, _message(key, header, body))):
        return None, Verdict.UNTRUSTED
    vector = np.frombuffer(body, dtype=_PAYLOAD_DTYPE).astype(np.float32, copy=False)
    if invalid_rows(vector[None, :], dim, unit_norm=unit_norm)[0]:
        return None, Verdict.INVALID
    return vector, Verdict.OK


def decode_vector(value: object, dim: int, key: str, *, secret: bytes | None = None) -> np.ndarray | None:
    """The stored vector for ``key``, or ``None`` when ``value`` does not verify (see ``check_value``)."""
    return check_value(value, dim, key, secret=secret)[0]


def payload_view(value: bytes) -> np.ndarray:
    """Read-only float32 view of the payload of a value ``encode_vector`` just produced."""
    dim = _HEADER.unpack_from(value)[3]
    return np.frombuffer(value, dtype=_PAYLOAD_DTYPE, offset=_HEADER.size, count=dim).astype(np.float32, copy=False)
