"""Stage 5, ``embeddings``: float32, L2-normalized vectors of the canonical chunks.

The model reads each chunk's contextual text (``core.chunking.contextual_text``: title and heading path,
then the text); the cache key and the stored ``text_sha256`` are its hash (``chunks.embed_sha256``).
Only canonical chunks without a vector for the current model fingerprint are looked at; of those,
only cache misses reach the model, and the model is loaded only if there is at least one miss or a
Redis hit to audit. Vectors of chunks that are no longer live or canonical are deleted.

The shared cache tier is a trust boundary; three doors keep a bad vector out of the warehouse:

1. **Repair first.** Stored vectors of this source that are not valid embeddings
   (``core.vector_checks``: wrong dimension, NaN/inf, not unit norm) are deleted with their int8/binary
   codes and re-embedded in this run by the model, bypassing every cache tier (the tier that produced
   them may still hold them). Calibration ranges that no set of unit vectors can produce (non-finite, or
   beyond [-1, 1]) are dropped with every code of the model, so the next stage calibrates again.
2. **Audit.** The cache serves only values bound to their key and valid (see ``resources.cache``);
   of the hits that came from Redis, ``max(1, ceil(audit_rate * n))`` per batch are re-embedded and
   compared (cosine >= ``AUDIT_MIN_COSINE``). On a mismatch Redis is distrusted for the rest of the run
   (one warning, ``redis_status = distrusted``): this batch's Redis hits are re-embedded, and the rows
   earlier batches of this run stored from Redis hits are deleted and embedded again.
3. **Guard.** Every batch is checked before it is inserted; a batch with an invalid vector raises
   ``InvalidEmbeddingError`` and nothing of it is written.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from embedding_assets.core.chunking import contextual_text
from embedding_assets.core.identity import embedding_cache_key
from embedding_assets.core.quantization import QuantizationError, ranges_from_bytes
from embedding_assets.core.vector_checks import (
    AUDIT_MIN_COSINE,
    NORM_TOLERANCE,
    audit_sample_size,
    invalid_rows,
    mismatched,
)
from embedding_assets.stages import ProgressFn, no_progress
from resources.cache import CacheHit, EmbeddingCacheResource
from resources.model import EmbeddingModelResource
from resources.warehouse import WarehouseResource, deleted_rows, insert_arrow, vectors_to_arrow

BATCH_CHUNKS = 512

# The chunks this source's run is responsible for (the same condition as the pending query).
_SOURCE_CHUNKS = """SELECT k.chunk_id FROM chunks k JOIN chunk_dedup x USING (chunk_id)
                    WHERE k.source = ? OR x.decided_in = ?"""

class InvalidEmbeddingError(RuntimeError):
    """The model returned a vector that is not a valid embedding; nothing of that batch was stored."""


@dataclass
class EmbedReport:
    source: str
    model_fingerprint: str = ""
    dimension: int = 0
    pending: int = 0
    embedded_by_model: int = 0
    cache_hits: dict[str, int] = field(default_factory=dict)
    tokens_embedded: int = 0
    padding_waste: float = 0.0
    model_seconds: float = 0.0
    removed: int = 0
    live_vectors: int = 0
    redis_status: str = "disabled"
    seconds: float = 0.0
    repaired: int = 0  # invalid stored vectors found, deleted and re-embedded
    quantization_reset: bool = False  # impossible calibration ranges dropped (with the codes)
    audited: int = 0  # Redis hits re-embedded to check them
    audit_mismatches: int = 0
    redone_after_distrust: int = 0  # rows stored from Redis earlier in the run, embedded again
    cache_rejected: dict[str, int] = field(default_factory=dict)  # malformed / untrusted / invalid values

    @property
    def chunks_per_second(self) -> float:
        return self.embedded_by_model / self.model_seconds if self.model_seconds else 0.0

    def trust_metadata(self) -> dict[str, int | bool]:
        """Run metadata of the cache's trust boundary (see the module docstring)."""
        return {
            "vectors_repaired": self.repaired,
            "quantization_reset": self.quantization_reset,
            "cache_audited": self.audited,
            "cache_audit_mismatches": self.audit_mismatches,
            "redone_after_distrust": self.redone_after_distrust,
            **{f"cache_rejected_{why}": n for why, n in sorted(self.cache_rejected.items())},
        }


def embed_source(
    warehouse: WarehouseResource,
    source: str,
    *,
    model: EmbeddingModelResource,
    cache: EmbeddingCacheResource,
    progress: ProgressFn = no_progress,
    rng: random.Random | None = None,
) -> EmbedReport:
    """Embed this source's pending canonical chunks; see the module docstring for the guarantees.

    ``rng`` picks the audited hits (default: the OS's randomness, so a writer cannot predict them).
    Raises ``InvalidEmbeddingError`` when the model itself returns an invalid vector.
    """
    started = time.perf_counter()
    fingerprint = model.model_fingerprint()
    dim = model.dimension()
    report = EmbedReport(source=source, model_fingerprint=fingerprint, dimension=dim)
    with warehouse.connect() as con:
        report.removed = _delete_dead_vectors(con, fingerprint, source)
        repaired_texts = _delete_invalid_vectors(con, fingerprint, source, dim)
        report.repaired = len(repaired_texts)
        report.quantization_reset = _drop_impossible_ranges(con, fingerprint)
        pending = con.execute(
            """SELECT k.chunk_id FROM chunks k JOIN chunk_dedup x USING (chunk_id)
               WHERE x.status = 'canonical' AND (k.source = ? OR x.decided_in = ?)
                 AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.chunk_id = k.chunk_id AND e.model_fingerprint = ?)
               ORDER BY k.chunk_id""",
            [source, source, fingerprint],
        ).fetchall()
    pending_ids = [row[0] for row in pending]
    report.pending = len(pending_ids)
    before = cache.stats()
    batcher = _Batcher(
        warehouse, model, cache, report, fingerprint, dim, bypass=set(repaired_texts),
        audit_rate=cache.effective_audit_rate(), rng=rng or random.SystemRandom(),
    )  # fmt: skip
    for start in range(0, len(pending_ids), BATCH_CHUNKS):
        batcher.run(pending_ids[start : start + BATCH_CHUNKS])
        progress("embeddings", min(start + BATCH_CHUNKS, len(pending_ids)), len(pending_ids), "chunks")
    if "redis" in cache.distrusted() and batcher.stored_from_redis:
        # Rows earlier batches took from Redis before the audit caught it: suspect, embed them again.
        redo = batcher.stored_from_redis
        batcher.stored_from_redis = []
        with warehouse.connect() as con:
            con.execute(
                "DELETE FROM embeddings WHERE model_fingerprint = ? AND chunk_id IN (SELECT unnest(?::VARCHAR[]))",
                [fingerprint, redo],
            )
        for start in range(0, len(redo), BATCH_CHUNKS):
            batcher.run(redo[start : start + BATCH_CHUNKS])
        report.redone_after_distrust = len(redo)
    tokens, padded = batcher.tokens, batcher.padded
    report.tokens_embedded = tokens
    report.padding_waste = 1.0 - tokens / padded if padded else 0.0
    after = cache.stats()
    report.cache_hits = {tier: after["hits"][tier] - before["hits"].get(tier, 0) for tier in after["hits"]}
    report.cache_rejected = {why: after[why] - before.get(why, 0) for why in ("malformed", "untrusted", "invalid")}
    report.redis_status = str(after.get("redis_status", "disabled"))
    report.live_vectors = warehouse.query_rows(
        "SELECT count(*) FROM embeddings WHERE source = ? AND model_fingerprint = ?", [source, fingerprint]
    )[0][0]
    report.seconds = time.perf_counter() - started
    return report


class _Batcher:
    """Embeds one batch of chunk ids at a time: cache lookup, audit, model for the rest, guard, insert."""

    def __init__(self, warehouse, model, cache, report: EmbedReport, fingerprint: str, dim: int, *,
                 bypass: set[str], audit_rate: float, rng: random.Random):  # fmt: skip
        self.warehouse, self.model, self.cache, self.report = warehouse, model, cache, report
        self.fingerprint, self.dim = fingerprint, dim
        self.bypass = bypass  # text hashes whose stored vectors were invalid: never read from a cache
        self.audit_rate = audit_rate
        self.rng = rng
        self.stored_from_redis: list[str] = []
        self.tokens = self.padded = 0

    def run(self, ids: list[str]) -> None:
        # What the model reads is the contextual text; its hash is the cache key (see stages.chunks).
        rows = [
            (cid, vid, source, contextual_text(context or "", text), embed_sha or text_sha, tokens)
            for cid, vid, source, text, text_sha, tokens, context, embed_sha in self.warehouse.query_rows(
                "SELECT chunk_id, vector_id, source, text, text_sha256, token_count, context, embed_sha256 FROM chunks "
                "WHERE chunk_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY chunk_id",
                [ids],
            )
        ]
        keys = [embedding_cache_key(self.fingerprint, row[4]) for row in rows]
        hits: list[CacheHit | None] = [None] * len(rows)
        looked_up = [i for i, row in enumerate(rows) if row[4] not in self.bypass]
        for i, hit in zip(looked_up, self.cache.lookup([keys[i] for i in looked_up], self.dim, unit_norm=True)):
            hits[i] = hit

        fresh = self._audit(rows, hits)
        if "redis" in self.cache.distrusted():
            hits = [None if hit is not None and hit.shared else hit for hit in hits]
            # Audited rows whose Redis hit is now rejected are served by the model's own vector: embedded.
            self.report.embedded_by_model += sum(1 for i in fresh if hits[i] is None)
        misses = [i for i, hit in enumerate(hits) if hit is None and i not in fresh]
        if misses:
            fresh.update(zip(misses, self._encode(rows, misses)))

        vectors = np.empty((len(rows), self.dim), dtype=np.float32)
        for i, hit in enumerate(hits):
            vectors[i] = fresh[i] if i in fresh else hit.vector  # a hit set to None above is always in fresh
        written = sorted(i for i in fresh if hits[i] is None)
        bad = np.flatnonzero(invalid_rows(vectors, self.dim))
        if len(bad):
            raise InvalidEmbeddingError(
                f"source {self.report.source!r}: the model returned {len(bad)} invalid vectors (NaN, inf or not unit "
                f"norm), e.g. for chunk {rows[bad[0]][0]}; nothing of this batch was stored. Check EMBEDDING_DTYPE "
                "(half precision can overflow) and the model folder."
            )
        if written:
            self.cache.set_many([(keys[i], vectors[i]) for i in written])
        with self.warehouse.connect() as con:
            _insert_vectors(con, rows, vectors, self.fingerprint)
        if "redis" not in self.cache.distrusted():
            self.stored_from_redis += [rows[i][0] for i, hit in enumerate(hits) if hit is not None and hit.shared]

    def _audit(self, rows, hits: list[CacheHit | None]) -> dict[int, np.ndarray]:
        """Re-embed a sample of this batch's Redis hits; distrust Redis on a mismatch. Returns the
        fresh vectors by row (they are the model's own and are used whatever the verdict)."""
        shared = [i for i, hit in enumerate(hits) if hit is not None and hit.shared]
        if "redis" in self.cache.distrusted():
            return {}
        sample = sorted(self.rng.sample(shared, audit_sample_size(len(shared), self.audit_rate)))
        if not sample:
            return {}
        computed = self._encode(rows, sample, audit=True)
        wrong = mismatched(np.stack([hits[i].vector for i in sample]), computed, AUDIT_MIN_COSINE)
        self.report.audited += len(sample)
        if wrong.any():
            self.report.audit_mismatches += int(wrong.sum())
            first = sample[int(np.flatnonzero(wrong)[0])]
            self.cache.distrust(
                "redis",
                f"{int(wrong.sum())} of {len(sample)} audited vectors are not the model's (cosine < {AUDIT_MIN_COSINE}), "
                f"e.g. chunk {rows[first][0]} of source {self.report.source!r}",
            )
        return dict(zip(sample, computed))

    def _encode(self, rows, which: list[int], audit: bool = False) -> np.ndarray:
        """Vectors of rows ``which`` from the model. Audits are counted in ``audited``, not as chunks embedded:
        ``embedded_by_model`` stays the count of chunks no cache tier could serve."""
        computed, stats = self.model.encode([rows[i][3] for i in which], [rows[i][5] for i in which])
        if not audit:
            self.report.embedded_by_model += len(which)
        self.report.model_seconds += stats.seconds
        self.tokens += stats.tokens
        self.padded += stats.padded_tokens
        return computed


def _insert_vectors(con, rows, vectors: np.ndarray, fingerprint: str) -> None:
    """Insert the batch's vectors, replacing other fingerprints' rows, skipping rows another run already wrote."""
    ids = [row[0] for row in rows]
    con.execute(
        "DELETE FROM embeddings WHERE chunk_id IN (SELECT unnest(?::VARCHAR[])) AND model_fingerprint <> ?",
        [ids, fingerprint],
    )
    done = {
        row[0]
        for row in con.execute(
            "SELECT chunk_id FROM embeddings WHERE chunk_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
        ).fetchall()
    }
    keep = [i for i, cid in enumerate(ids) if cid not in done]
    if not keep:
        return
    insert_arrow(
        con,
        "embeddings",
        {
            "chunk_id": [ids[i] for i in keep],
            "vector_id": [rows[i][1] for i in keep],
            "source": [rows[i][2] for i in keep],
            "text_sha256": [rows[i][4] for i in keep],
            "model_fingerprint": [fingerprint] * len(keep),
            "vector": vectors_to_arrow(vectors[keep]),
        },
    )


def _delete_dead_vectors(con, fingerprint: str, source: str) -> int:
    """Drop vectors of chunks that are gone or no longer canonical (any source), and this source's stale-model rows."""
    condition = """NOT EXISTS (SELECT 1 FROM chunk_dedup x JOIN chunks k USING (chunk_id)
                               WHERE x.chunk_id = e.chunk_id AND x.status = 'canonical')
                   OR (e.source = ? AND e.model_fingerprint <> ?)"""
    return deleted_rows(con, f"DELETE FROM embeddings e WHERE {condition}", [source, fingerprint])  # noqa: S608 - SQL fragments and table names are module constants; values are parameters


def _delete_invalid_vectors(con, fingerprint: str, source: str, dim: int) -> list[str]:
    """Delete this source's stored vectors (and their codes) that are not valid embeddings.

    Returns the text hashes of the deleted rows: the run re-embeds them without reading any cache.
    """
    found = con.execute(
        f"""SELECT e.chunk_id, e.text_sha256 FROM embeddings e
            WHERE e.model_fingerprint = ? AND e.chunk_id IN ({_SOURCE_CHUNKS}) AND {con.invalid_vector("e.vector")}""",  # noqa: S608 - SQL fragments are module constants; values are parameters
        [fingerprint, source, source, dim, NORM_TOLERANCE],
    ).fetchall()
    if not found:
        return []
    ids = [row[0] for row in found]
    for table in ("embeddings", "quantized_embeddings"):
        con.execute(
            f"DELETE FROM {table} WHERE model_fingerprint = ? AND chunk_id IN (SELECT unnest(?::VARCHAR[]))",  # noqa: S608 - SQL fragments and table names are module constants; values are parameters
            [fingerprint, ids],
        )
    return sorted({row[1] for row in found})


def _drop_impossible_ranges(con, fingerprint: str) -> bool:
    """Drop int8 calibration ranges no unit vectors can produce, with every code made from them."""
    row = con.execute(
        "SELECT ranges, dim FROM quantization_ranges WHERE model_fingerprint = ?", [fingerprint]
    ).fetchone()
    if row is None:
        return False
    try:
        ranges = ranges_from_bytes(bytes(row[0]), row[1])
        possible = bool(np.isfinite(ranges).all() and np.abs(ranges).max() <= 1.0 + NORM_TOLERANCE)
    except QuantizationError:
        possible = False
    if possible:
        return False
    con.execute("DELETE FROM quantization_ranges WHERE model_fingerprint = ?", [fingerprint])
    con.execute("DELETE FROM quantized_embeddings WHERE model_fingerprint = ?", [fingerprint])
    return True
