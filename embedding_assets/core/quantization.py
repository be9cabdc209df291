"""Scalar (int8) and binary quantization of embeddings (stage ``quantized_embeddings``).

The same codes as ``sentence_transformers.util.quantization.quantize_embeddings`` (``int8``: per
dimension ``floor((x - min) / step)`` clipped to [0, 255], minus 128, ``step = (max - min) / 255``;
``ubinary``: sign bits packed 8 per byte), written in numpy so that importing this module does not
import torch (a test keeps the two equal). The one rule this module enforces: int8 ranges are calibrated ONCE from a corpus sample and then reused for
every batch. Calibrating per call gives every batch different buckets, so codes of different
batches are not comparable (sentence-transformers #2865), and a single vector cannot be
calibrated at all (#2837). Ranges are stored next to the codes (``ranges_to_bytes``).
"""

from __future__ import annotations

import numpy as np

_RANGES_DTYPE = np.dtype("<f4")
# int8 codes span 256 buckets per dimension, from ranges[0] to ranges[1].
_INT8_BUCKETS = 255


class QuantizationError(ValueError):
    """Embeddings or ranges that cannot be quantized: wrong shape, dtype or non-finite values."""


def _float_matrix(embeddings: np.ndarray, what: str) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise QuantizationError(f"{what} must be 2-D (n, dim), got shape {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise QuantizationError(f"{what} must be float embeddings, got dtype {embeddings.dtype}")
    if not np.all(np.isfinite(embeddings)):
        raise QuantizationError(f"{what} contains NaN or infinite values")
    return embeddings.astype(np.float32, copy=False)


def _check_ranges(ranges: np.ndarray, dim: int) -> np.ndarray:
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, dim):
        raise QuantizationError(f"ranges must have shape (2, {dim}), got {ranges.shape}")
    if not np.all(np.isfinite(ranges)) or np.any(ranges[0] > ranges[1]):
        raise QuantizationError("ranges must be finite with min <= max in every dimension")
    return ranges


def calibration_ranges(sample: np.ndarray, *, min_half_width: float = 0.0) -> np.ndarray:
    """Per-dimension [min; max] of a float sample (n, dim), n >= 1: array (2, dim) float32.

    ``min_half_width`` widens any dimension whose range is narrower than ``2 * min_half_width``
    symmetrically around its centre, so a small sample does not squeeze later vectors into a few buckets.
    Compute once from a representative corpus sample and reuse for every batch.
    Raises QuantizationError on an empty, non-2-D, non-float or non-finite sample.
    """
    sample = _float_matrix(sample, "calibration sample")
    if sample.shape[0] == 0:
        raise QuantizationError("calibration sample is empty: need at least one embedding")
    low, high = sample.min(axis=0), sample.max(axis=0)
    centre, half = (low + high) / 2, np.maximum((high - low) / 2, min_half_width)
    return np.stack([centre - half, centre + half]).astype(np.float32) if min_half_width > 0 else np.stack([low, high]).astype(np.float32)


def quantize_int8(embeddings: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """int8 codes (n, dim) of float embeddings (n, dim) under fixed calibration ``ranges`` (2, dim).

    Each vector's code depends only on the vector and the ranges, never on the rest of the
    batch. Values outside the ranges are clipped to the first / last bucket.
    Raises QuantizationError on shape mismatch or non-finite input.
    """
    embeddings = _float_matrix(embeddings, "embeddings")
    ranges = _check_ranges(ranges, embeddings.shape[1])
    # Clip first so the result never depends on the library's out-of-range handling.
    clipped = np.clip(embeddings, ranges[0], ranges[1])
    steps = (ranges[1] - ranges[0]) / _INT8_BUCKETS
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((clipped - ranges[0]) / steps), 0, _INT8_BUCKETS)
    return (buckets - 128).astype(np.int8)


def quantize_binary(embeddings: np.ndarray) -> np.ndarray:
    """Sign bits of float embeddings (n, dim), packed 8 per byte: uint8 (n, ceil(dim / 8)).

    Bit order is numpy ``packbits`` big-endian within a byte, the layout FAISS
    ``IndexBinary*`` expects (FAISS needs dim to be a multiple of 8).
    Raises QuantizationError on non-2-D or non-finite input.
    """
    embeddings = _float_matrix(embeddings, "embeddings")
    return np.packbits(embeddings > 0, axis=-1)


def bytes_per_vector(dim: int) -> dict[str, int]:
    """Storage size of one vector of ``dim`` dimensions in each precision."""
    return {"float32": 4 * dim, "int8": dim, "binary": (dim + 7) // 8}


def dequantize_int8(int8_vectors: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Float32 (n, dim) bucket centres of int8 codes (n, dim) under ``ranges`` (2, dim).

    The centre (not the bucket's lower edge) keeps the reconstruction unbiased.
    """
    codes = np.asarray(int8_vectors)
    if codes.ndim != 2 or codes.dtype != np.int8:
        raise QuantizationError(
            f"int8 vectors must be a 2-D int8 array, got shape {codes.shape} dtype {codes.dtype}"
        )
    ranges = _check_ranges(ranges, codes.shape[1])
    steps = (ranges[1] - ranges[0]) / _INT8_BUCKETS
    # Same zero-width rule as the quantizer: a constant dimension has step 1 and code -128.
    steps = np.where(steps == 0, 1, steps)
    buckets = codes.astype(np.float32) + 128.0
    centres = ranges[0] + (buckets + 0.5) * steps
    return np.minimum(centres, np.maximum(ranges[1], ranges[0])).astype(np.float32)


def int8_rescore(query: np.ndarray, int8_vectors: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Approximate dot products of float queries with int8-coded vectors.

    ``query`` is (dim,) -> scores (n,), or (nq, dim) -> scores (nq, n), float32. Used to
    rescore binary-search candidates: the float query against the dequantized codes.
    """
    query = np.asarray(query)
    single = query.ndim == 1
    queries = _float_matrix(query[None, :] if single else query, "query")
    vectors = dequantize_int8(int8_vectors, ranges)
    if queries.shape[1] != vectors.shape[1]:
        raise QuantizationError(
            f"query dim {queries.shape[1]} does not match int8 vector dim {vectors.shape[1]}"
        )
    scores = queries @ vectors.T
    return scores[0] if single else scores


def ranges_to_bytes(ranges: np.ndarray) -> bytes:
    """Ranges (2, dim) as little-endian float32 bytes (min row, then max row)."""
    ranges = np.asarray(ranges)
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise QuantizationError(f"ranges must have shape (2, dim), got {ranges.shape}")
    return ranges.astype(_RANGES_DTYPE).tobytes()


def ranges_from_bytes(blob: bytes, dim: int | None = None) -> np.ndarray:
    """Inverse of ``ranges_to_bytes``: (2, dim) float32.

    ``dim`` (optional) is checked against the blob; raises QuantizationError when the blob
    is not two float32 rows of that width.
    """
    expected = None if dim is None else 2 * 4 * dim
    if len(blob) == 0 or len(blob) % 8 or (expected is not None and len(blob) != expected):
        raise QuantizationError(
            f"ranges blob has {len(blob)} bytes, expected two float32 rows"
            + ("" if dim is None else f" of dim={dim} ({expected} bytes)")
        )
    return np.frombuffer(blob, dtype=_RANGES_DTYPE).astype(np.float32).reshape(2, -1)
