"""Near-duplicate detection with MinHash (stage ``deduped_chunks``).

Exact duplicates are caught by ``identity.text_sha256``; this module owns the *near*
duplicates: the word-shingle sets, their MinHash signatures (built by datasketch), the LSH
banding parameters and the band keys the warehouse stores.

The warehouse keeps band keys in a DuckDB table so near-duplicate checks run against the
whole corpus, across partitions and processes, without an LSH index in memory. That only
works if every value here is a pure function of the text and the settings, identical in
every process and on every machine: signatures come from seeded permutations and band keys
from blake2b, never from Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from embedding_assets.core.identity import fingerprint, normalize_text

# Signatures are stored as BLOBs of little-endian uint64, whatever the host byte order.
_SIGNATURE_DTYPE = np.dtype("<u8")


@dataclass(frozen=True)
class MinHashSettings:
    """Everything that changes a signature or a near-duplicate decision.

    ``scheme`` pins datasketch's permutation scheme: its default has changed between
    releases, and signatures of different schemes are not comparable. ``affine64`` gives
    native 64-bit hash values, matching the uint64 signatures stored.
    """

    num_perm: int = 128
    shingle_words: int = 5
    threshold: float = 0.8
    seed: int = 1
    scheme: str = "affine64"


def dedup_fingerprint(settings: MinHashSettings) -> str:
    """Stable id of the dedup settings; stored next to signatures and band keys."""
    return fingerprint("dedup", asdict(settings))


def shingles(text: str, shingle_words: int) -> list[bytes]:
    """Word k-grams (k = ``shingle_words``) of the normalized, lower-cased text, UTF-8 encoded.

    A text with fewer than k words yields one shingle of all its words, so short chunks
    still get a signature; an empty or whitespace-only text yields ``[]``.
    Raises ValueError if ``shingle_words < 1``.
    """
    if shingle_words < 1:
        raise ValueError(f"shingle_words must be >= 1, got {shingle_words}")
    words = normalize_text(text).lower().split()
    if not words:
        return []
    if len(words) < shingle_words:
        return [" ".join(words).encode("utf-8")]
    return [
        " ".join(words[start : start + shingle_words]).encode("utf-8")
        for start in range(len(words) - shingle_words + 1)
    ]


def minhash_signatures(texts: Sequence[str], settings: MinHashSettings) -> np.ndarray:
    """MinHash signatures of ``texts``: array of shape (len(texts), num_perm), dtype uint64.

    Built with ``datasketch.MinHash.generator``, which initialises the seeded permutations
    once and hashes each text's shingles in one vectorised ``update_batch``. The same
    settings give the same values in any process. An empty text has no shingles and keeps
    datasketch's initial all-max signature; callers should not send empty chunks (any two
    of them would look identical).
    """
    if not texts:
        return np.zeros((0, settings.num_perm), dtype=_SIGNATURE_DTYPE)
    shingle_sets = (shingles(text, settings.shingle_words) for text in texts)
    from datasketch import MinHash  # imported here: datasketch pulls in scipy (~1.5 s), needed only to dedup

    minhashes = MinHash.generator(
        shingle_sets, num_perm=settings.num_perm, seed=settings.seed, scheme=settings.scheme
    )
    return np.stack([m.hashvalues for m in minhashes]).astype(_SIGNATURE_DTYPE)


def lsh_bands(settings: MinHashSettings) -> tuple[int, int]:
    """(bands b, rows r) that datasketch's MinHashLSH picks for (threshold, num_perm).

    Asks an empty in-memory ``MinHashLSH`` (its optimizer, equal false-positive /
    false-negative weights), so the warehouse's banding is exactly datasketch's.
    Raises ValueError for a threshold outside [0, 1] or fewer than 2 bands.
    """
    try:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm)
    except ValueError as error:
        raise ValueError(
            f"no LSH banding for threshold={settings.threshold}, num_perm={settings.num_perm}: {error}"
        ) from error
    return lsh.b, lsh.r


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """LSH band keys: array of shape (n, bands), dtype int64.

    The key of band i of a row is the first 8 bytes of blake2b(i as 4-byte little-endian ||
    the band's ``rows`` uint64 values as little-endian bytes), read as a little-endian signed
    int64 (DuckDB BIGINT). Hashing the band index in keeps equal slices of different bands
    apart, so one table column can hold all bands. Raises ValueError if the signature is
    shorter than ``bands * rows`` or not 2-D.
    """
    signatures = np.asarray(signatures)
    if signatures.ndim != 2:
        raise ValueError(f"signatures must be 2-D (n, num_perm), got shape {signatures.shape}")
    if bands * rows > signatures.shape[1]:
        raise ValueError(
            f"bands*rows = {bands}*{rows} exceeds the signature length {signatures.shape[1]}"
        )
    little = np.ascontiguousarray(signatures, dtype=_SIGNATURE_DTYPE)
    digests = bytearray()
    for row in little:
        for band in range(bands):
            payload = band.to_bytes(4, "little") + row[band * rows : (band + 1) * rows].tobytes()
            digests += hashlib.blake2b(payload).digest()[:8]
    return np.frombuffer(bytes(digests), dtype="<i8").astype(np.int64).reshape(len(little), bands)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """MinHash estimate of Jaccard similarity: the fraction of equal hash values.

    ``a`` is one signature (num_perm,); ``b`` is one signature (-> float) or a matrix
    (m, num_perm) (-> float64 array of shape (m,)). Raises ValueError on length mismatch.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or b.ndim not in (1, 2) or a.shape[0] != b.shape[-1]:
        raise ValueError(f"cannot compare signatures of shapes {a.shape} and {b.shape}")
    equal = np.count_nonzero(a == b, axis=-1) / a.shape[0]
    return float(equal) if b.ndim == 1 else equal.astype(np.float64)


def find_near_duplicates_within(
    signatures: np.ndarray, settings: MinHashSettings
) -> list[int | None]:
    """For each row of a batch, in order: the index of an earlier row it near-duplicates, or None.

    A near duplicate shares at least one band key (LSH candidate) AND has
    ``estimated_jaccard >= settings.threshold``. Only rows that are themselves kept (None)
    are indexed, as in the usual query-then-insert LSH loop: every returned index points to
    a kept row, and a chain A~B~C where C is close to B but not to A keeps C. Among several
    matches the earliest kept row wins. Runs in ~linear time by bucketing on band keys.
    """
    bands, rows = lsh_bands(settings)
    keys = band_keys(signatures, bands, rows)
    # Band keys already hash the band index in, so one dict serves all bands.
    buckets: dict[int, list[int]] = {}
    result: list[int | None] = []
    for position, row_keys in enumerate(keys.tolist()):
        candidates = sorted({kept for key in row_keys for kept in buckets.get(key, ())})
        match = None
        if candidates:
            similarity = estimated_jaccard(signatures[position], signatures[candidates])
            hits = np.flatnonzero(similarity >= settings.threshold)
            if hits.size:
                match = candidates[int(hits[0])]
        result.append(match)
        if match is None:
            for key in row_keys:
                buckets.setdefault(key, []).append(position)
    return result


def signature_to_bytes(signature: np.ndarray) -> bytes:
    """One signature (num_perm,) as little-endian uint64 bytes, for a BLOB column."""
    signature = np.asarray(signature)
    if signature.ndim != 1:
        raise ValueError(f"expected one signature (num_perm,), got shape {signature.shape}")
    return signature.astype(_SIGNATURE_DTYPE).tobytes()


def signature_from_bytes(blob: bytes, num_perm: int) -> np.ndarray:
    """Inverse of ``signature_to_bytes``: (num_perm,) uint64 in native byte order.

    Raises ValueError if the blob does not hold exactly ``num_perm`` values (a signature
    written with other settings).
    """
    if len(blob) != 8 * num_perm:
        raise ValueError(
            f"signature blob has {len(blob)} bytes, expected {8 * num_perm} for num_perm={num_perm}"
        )
    return np.frombuffer(blob, dtype=_SIGNATURE_DTYPE).astype(np.uint64)
