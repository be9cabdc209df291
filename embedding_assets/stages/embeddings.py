"""Stage 5, ``embeddings``: float32, L2-normalized vectors of the canonical chunks.

Only canonical chunks without a vector for the current model fingerprint are looked at; of those,
only cache misses reach the model, and the model is loaded only if there is at least one miss.
Vectors of chunks that are no longer live or canonical are deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from embedding_assets.core.identity import embedding_cache_key
from embedding_assets.stages import ProgressFn, no_progress
from resources.cache import EmbeddingCacheResource
from resources.model import EmbeddingModelResource
from resources.warehouse import WarehouseResource, deleted_rows, insert_arrow, vectors_to_arrow

BATCH_CHUNKS = 512


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

    @property
    def chunks_per_second(self) -> float:
        return self.embedded_by_model / self.model_seconds if self.model_seconds else 0.0


def embed_source(
    warehouse: WarehouseResource,
    source: str,
    *,
    model: EmbeddingModelResource,
    cache: EmbeddingCacheResource,
    progress: ProgressFn = no_progress,
) -> EmbedReport:
    started = time.perf_counter()
    fingerprint = model.model_fingerprint()
    dim = model.dimension()
    report = EmbedReport(source=source, model_fingerprint=fingerprint, dimension=dim)
    with warehouse.connect() as con:
        report.removed = _delete_dead_vectors(con, fingerprint, source)
        pending = con.execute(
            """SELECT k.chunk_id FROM chunks k JOIN chunk_dedup x USING (chunk_id)
               WHERE x.status = 'canonical' AND (k.source = ? OR x.decided_in = ?)
                 AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.chunk_id = k.chunk_id AND e.model_fingerprint = ?)
               ORDER BY k.chunk_id""",
            [source, source, fingerprint],
        ).fetchall()
    pending_ids = [row[0] for row in pending]
    report.pending = len(pending_ids)
    hits_before = _tier_hits(cache)
    padded = tokens = 0
    for start in range(0, len(pending_ids), BATCH_CHUNKS):
        ids = pending_ids[start : start + BATCH_CHUNKS]
        rows = warehouse.query_rows(
            "SELECT chunk_id, vector_id, source, text, text_sha256, token_count FROM chunks "
            "WHERE chunk_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY chunk_id",
            [ids],
        )
        keys = [embedding_cache_key(fingerprint, row[4]) for row in rows]
        cached = cache.get_many(keys, dim)
        vectors = np.empty((len(rows), dim), dtype=np.float32)
        misses = [i for i, v in enumerate(cached) if v is None]
        for i, v in enumerate(cached):
            if v is not None:
                vectors[i] = v
        if misses:
            computed, stats = model.encode([rows[i][3] for i in misses], [rows[i][5] for i in misses])
            vectors[misses] = computed
            cache.set_many([(keys[i], computed[j]) for j, i in enumerate(misses)])
            report.embedded_by_model += len(misses)
            report.model_seconds += stats.seconds
            tokens += stats.tokens
            padded += stats.padded_tokens
        with warehouse.connect() as con:
            _insert_vectors(con, rows, vectors, fingerprint)
        progress("embeddings", min(start + BATCH_CHUNKS, len(pending_ids)), len(pending_ids), "chunks")
    report.tokens_embedded = tokens
    report.padding_waste = 1.0 - tokens / padded if padded else 0.0
    after = _tier_hits(cache)
    report.cache_hits = {tier: after[tier] - hits_before.get(tier, 0) for tier in after}
    report.redis_status = str(cache.stats().get("redis_status", "disabled"))
    report.live_vectors = warehouse.query_rows(
        "SELECT count(*) FROM embeddings WHERE source = ? AND model_fingerprint = ?", [source, fingerprint]
    )[0][0]
    report.seconds = time.perf_counter() - started
    return report


def _tier_hits(cache: EmbeddingCacheResource) -> dict[str, int]:
    stats = cache.stats()
    hits = stats.get("hits", {})
    return {tier: int(hits.get(tier, 0)) for tier in ("lru", "redis", "disk")}


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
    return deleted_rows(con, f"DELETE FROM embeddings e WHERE {condition}", [source, fingerprint])
