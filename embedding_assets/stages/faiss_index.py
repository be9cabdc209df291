"""Stage 7, ``faiss_index``: one IVF index over every partition's canonical vectors, published atomically.

Three streaming passes over the vectors (ordered by vector id): collect the training and query
samples, add every vector, compute exact top-k for the queries. Then nprobe is tuned to the recall
target and the version is published through the index store; the previous version stays current
until the new one is complete.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from embedding_assets.core.ivf import (
    MIN_POINTS_PER_CENTROID,
    IndexBuildError,
    add_vectors,
    build_index,
    exact_top_k,
    factory_string,
    ivf_nlist,
    sample_rows,
    tune_nprobe,
    write_index,
)
from embedding_assets.stages import ProgressFn, no_progress
from resources.index_store import IndexStoreResource, PublishedIndex
from resources.warehouse import WarehouseResource, arrow_to_vectors

# Live canonical vectors of one model: what the index must hold, exactly.
_LIVE_VECTORS = """
    FROM embeddings e JOIN chunk_dedup x USING (chunk_id) JOIN chunks k USING (chunk_id)
    WHERE e.model_fingerprint = ? AND x.status = 'canonical'"""
MAX_TRAINING_POINTS_PER_CENTROID = 256


@dataclass(frozen=True)
class IndexSettings:
    factory_template: str = "IVF{nlist},Flat"
    target_recall: float = 0.95
    recall_k: int = 10
    recall_queries: int = 200
    min_nlist: int = 8


@dataclass
class IndexReport:
    version: str = ""
    count: int = 0
    dimension: int = 0
    factory: str = ""
    nlist: int = 0
    nprobe: int = 0
    recall_at_k: float = 0.0
    training_points: int = 0
    index_bytes: int = 0
    seconds: float = 0.0


def missing_vectors(warehouse: WarehouseResource, model_fingerprint: str) -> dict[str, int]:
    """Per source: live canonical chunks without a vector of this model (must be 0 to build)."""
    return dict(
        warehouse.query_rows(
            """SELECT k.source, count(*) FROM chunks k JOIN chunk_dedup x USING (chunk_id)
               WHERE x.status = 'canonical' AND NOT EXISTS (SELECT 1 FROM embeddings e
                     WHERE e.chunk_id = k.chunk_id AND e.model_fingerprint = ?)
               GROUP BY k.source ORDER BY k.source""",
            [model_fingerprint],
        )
    )


def build_and_publish(
    warehouse: WarehouseResource,
    index_store: IndexStoreResource,
    *,
    model_fingerprint: str,
    dimension: int,
    settings: IndexSettings,
    progress: ProgressFn = no_progress,
) -> tuple[IndexReport, PublishedIndex]:
    started = time.perf_counter()
    missing = missing_vectors(warehouse, model_fingerprint)
    if missing:
        detail = ", ".join(f"{source}: {n}" for source, n in missing.items())
        raise IndexBuildError(
            f"not every live chunk has a vector of model {model_fingerprint} ({detail}); "
            "materialize embeddings for those sources first"
        )
    n, distinct = warehouse.query_rows(f"SELECT count(*), count(DISTINCT e.vector_id) {_LIVE_VECTORS}", [model_fingerprint])[0]
    if n == 0:
        raise IndexBuildError("no vectors to index: materialize at least one source first")
    if distinct != n:
        raise IndexBuildError(f"{n - distinct} vector id collisions among {n} chunks; report this as a bug")
    factory = factory_string(n, settings.factory_template, min_nlist=settings.min_nlist)
    nlist = _nlist_of(factory)
    training_size = min(n, MAX_TRAINING_POINTS_PER_CENTROID * nlist) if nlist else 0
    if nlist and training_size < MIN_POINTS_PER_CENTROID * nlist:
        raise IndexBuildError(f"{n} vectors cannot train {nlist} lists (need {MIN_POINTS_PER_CENTROID} per list)")
    train_positions = sample_rows(n, training_size, seed=0)
    query_positions = sample_rows(n, min(n, settings.recall_queries), seed=1)

    training, queries = _collect_rows(warehouse, model_fingerprint, [train_positions, query_positions], dimension)
    index = build_index(factory, dimension, training)
    added = 0
    for ids, vectors in _stream(warehouse, model_fingerprint, dimension):
        add_vectors(index, ids, vectors)
        added += len(ids)
        progress("faiss_index", added, n, "vectors")
    k = min(settings.recall_k, n)
    truth = exact_top_k(queries, _stream(warehouse, model_fingerprint, dimension), k)
    nprobe, recall = tune_nprobe(index, queries, truth, k=k, target_recall=settings.target_recall)

    report = IndexReport(
        count=int(index.ntotal), dimension=dimension, factory=factory, nlist=ivf_nlist(index),
        nprobe=nprobe, recall_at_k=recall, training_points=len(training),
    )
    with index_store.new_version() as scratch:
        write_index(index, scratch / "index.faiss")
        report.index_bytes = (scratch / "index.faiss").stat().st_size
        published = index_store.publish(
            scratch,
            {
                "model_fingerprint": model_fingerprint,
                "dimension": dimension,
                "metric": "inner_product",
                "factory": factory,
                "nlist": report.nlist,
                "nprobe": nprobe,
                "count": report.count,
                "recall_at_k": recall,
                "recall_k": k,
                "target_recall": settings.target_recall,
                "training_points": report.training_points,
                "ids": "int64 vector_id = first 63 bits of chunk_id (chunks.vector_id)",
            },
        )
    report.version = published.version
    report.seconds = time.perf_counter() - started
    return report, published


def _nlist_of(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 0


def _stream(warehouse: WarehouseResource, model_fingerprint: str, dimension: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in warehouse.stream_arrow(
        f"SELECT e.vector_id, e.vector {_LIVE_VECTORS} ORDER BY e.vector_id", [model_fingerprint], batch_rows=8192
    ):
        ids = batch.column(0).to_numpy().astype(np.int64)
        yield ids, arrow_to_vectors(batch.column(1), dimension)


def _collect_rows(warehouse, model_fingerprint: str, position_sets: list[np.ndarray], dimension: int) -> list[np.ndarray]:
    """Vectors at the given row positions (each set sorted), in one streaming pass."""
    out = [np.empty((len(p), dimension), dtype=np.float32) for p in position_sets]
    cursor = [0] * len(position_sets)
    offset = 0
    for _, vectors in _stream(warehouse, model_fingerprint, dimension):
        end = offset + len(vectors)
        for s, positions in enumerate(position_sets):
            lo = cursor[s]
            hi = int(np.searchsorted(positions, end))
            if hi > lo:
                out[s][lo:hi] = vectors[positions[lo:hi] - offset]
                cursor[s] = hi
        offset = end
    return out
