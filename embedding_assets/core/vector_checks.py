"""What a stored embedding must look like, and how the cache audit compares vectors.

One definition, used at every door a vector passes: a cache value before it is served, a batch
before it is written to the warehouse, and the rows already stored (the SQL in
``stages/embeddings.py`` mirrors ``invalid_rows`` and names this module).

Invariant of a valid embedding of a model with dimension ``dim``: shape ``(dim,)``, every value
finite, and ``|v . v - 1| < NORM_TOLERANCE`` (the model resource renormalizes in float32, so its
vectors are within ~1e-6 of unit norm; 1e-3 is the bound the index quality gates use as well).
"""

from __future__ import annotations

import math

import numpy as np

NORM_TOLERANCE = 1e-3
"""Largest accepted ``|v . v - 1|`` for a unit-norm embedding."""

AUDIT_MIN_COSINE = 0.99
"""Smallest cosine between a cached vector and the model's fresh vector of the same text that still
counts as the same embedding. Same fingerprint means same weights, dtype and max length, so honest
vectors differ only by batch padding and device noise (cosine > 0.999 even between bf16 and fp32);
a well-formed vector of another text is far below (MiniLM: unrelated texts ~0.0-0.4)."""


def invalid_rows(vectors: np.ndarray, dim: int, *, unit_norm: bool = True) -> np.ndarray:
    """Boolean mask, one per row of ``vectors`` (n, d): True where the row is not a valid embedding.

    Every row is invalid when ``d != dim``. With ``unit_norm`` a finite row is also invalid when
    its squared norm is not strictly within ``NORM_TOLERANCE`` of 1 (as the ``vectors_are_unit_norm``
    asset check). Never raises for finite or non-finite floats; a non-2-D input raises ``ValueError``.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {vectors.shape}")
    if vectors.shape[1] != dim:
        return np.ones(vectors.shape[0], dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        as64 = vectors.astype(np.float64)
        bad = ~np.isfinite(as64).all(axis=1)
        if unit_norm:
            squared = np.einsum("ij,ij->i", as64, as64)
            bad |= ~(np.abs(squared - 1.0) < NORM_TOLERANCE)  # NaN compares False: stays bad
    return bad


def audit_sample_size(shared_hits: int, rate: float) -> int:
    """How many of a batch's ``shared_hits`` to re-embed: ``max(1, ceil(rate * n))``, at most n;
    0 when ``rate`` is 0 (audit off) or there are no shared hits."""
    if shared_hits <= 0 or rate <= 0:
        return 0
    return min(shared_hits, max(1, math.ceil(rate * shared_hits)))


def mismatched(cached: np.ndarray, fresh: np.ndarray, min_cosine: float = AUDIT_MIN_COSINE) -> np.ndarray:
    """Boolean mask over rows: True where ``cached[i]`` is not the model's vector ``fresh[i]``.

    Both (n, dim). Cosine is computed in float64 on the rows as given (no renormalization: a
    wrong norm is itself a mismatch only through ``invalid_rows``); a non-finite row is a mismatch.
    """
    a = np.asarray(cached, dtype=np.float64)
    b = np.asarray(fresh, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        cosine = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return ~(cosine >= min_cosine)
