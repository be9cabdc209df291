"""Stage 7, ``faiss_index``: one IVF index over every partition's canonical vectors, published atomically.

Lifecycle of the index:

- **unchanged**: the live vector ids equal the published ones and the settings match: nothing is
  written, the published version stays.
- **incremental**: the published index still fits (same model and factory template, the count has not
  grown past 2x what the quantizer was trained on, added vectors are not drifting away from the
  centroids): removed ids go out with ``remove_ids``, new vectors go in with ``add_with_ids``, no retraining.
- **full**: otherwise the index is trained again from a fresh sample and every vector is added.

Either way nprobe is re-tuned against exact search, and the new version is published through the
index store; the previous version stays current and loadable until the new one is complete.
The published version keeps its sorted vector ids (``ids.npy``) so the next build can diff against them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from embedding_assets.core.ivf import (
    MIN_POINTS_PER_CENTROID,
    IndexBuildError,
    add_vectors,
    build_index,
    centroid_similarity,
    choose_nlist,
    exact_top_k,
    factory_string,
    ivf_nlist,
    read_index,
    remove_ids,
    required_recall,
    retrain_reason,
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
# How nprobe is tuned (see ivf.tune_nprobe); an index tuned by another rule is re-tuned, not kept as is.
NPROBE_RULE = "smallest nprobe with sample recall >= required_recall(target, queries, k, z=1.645)"
FETCH_BATCH = 8192


class MissingVectors(IndexBuildError):
    """Live canonical chunks have no vector of the model yet; ``missing`` is {source: count}."""

    def __init__(self, model_fingerprint: str, missing: dict[str, int]):
        detail = ", ".join(f"{source}: {n}" for source, n in missing.items())
        super().__init__(
            f"not every live chunk has a vector of model {model_fingerprint} ({detail}); "
            "materialize embeddings for those sources first"
        )
        self.missing = missing


class CorpusChanged(IndexBuildError):
    """Another run changed the live chunks or vectors while this build was reading them; build again."""


@dataclass(frozen=True)
class LiveSnapshot:
    """What the index must hold, summarized in one read: live canonical chunks, how many have a vector
    of the model, and XOR digests of their vector ids. Equal snapshots before and after a build mean
    no run wrote in between."""

    canonical: int
    with_vectors: int
    chunk_digest: int
    vector_digest: int


def live_snapshot(warehouse: WarehouseResource, model_fingerprint: str) -> LiveSnapshot:
    row = warehouse.query_rows(
        """SELECT count(*), count(e.vector_id), coalesce(bit_xor(k.vector_id), 0), coalesce(bit_xor(e.vector_id), 0)
           FROM chunks k JOIN chunk_dedup x USING (chunk_id)
           LEFT JOIN embeddings e ON e.chunk_id = k.chunk_id AND e.model_fingerprint = ?
           WHERE x.status = 'canonical'""",
        [model_fingerprint],
    )[0]
    return LiveSnapshot(*(int(v) for v in row))


@dataclass(frozen=True)
class IndexSettings:
    factory_template: str = "IVF{nlist},Flat"
    target_recall: float = 0.95
    recall_k: int = 10
    recall_queries: int = 200
    min_nlist: int = 8
    max_growth: float = 2.0  # retrain when the corpus grows past this multiple of the trained count


@dataclass
class IndexReport:
    mode: str = ""  # unchanged | incremental | full
    retrain_reason: str = ""
    version: str = ""
    count: int = 0
    added: int = 0
    removed: int = 0
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


def current_if_unchanged(
    warehouse: WarehouseResource,
    index_store: IndexStoreResource,
    *,
    model_fingerprint: str,
    dimension: int,
    settings: IndexSettings,
) -> PublishedIndex | None:
    """The published index when a build would change nothing (same live ids, model and settings), else None.

    Cheap (one id query): lets an orchestrator skip launching a no-op index run.
    """
    current = index_store.current()
    if current is None or missing_vectors(warehouse, model_fingerprint):
        return None
    live_ids = _live_ids(warehouse, model_fingerprint)
    if not len(live_ids):
        return None
    return current if _plan(current, live_ids, model_fingerprint, dimension, settings).mode == "unchanged" else None


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
    snapshot = live_snapshot(warehouse, model_fingerprint)
    if snapshot.with_vectors != snapshot.canonical:
        missing = missing_vectors(warehouse, model_fingerprint)
        if missing:
            raise MissingVectors(model_fingerprint, missing)
        raise CorpusChanged("vectors were written while the index build started")
    live_ids = _live_ids(warehouse, model_fingerprint)
    n = len(live_ids)
    if n != snapshot.with_vectors:
        raise CorpusChanged(f"{n} live vectors read, {snapshot.with_vectors} a moment before")
    if n == 0:
        raise IndexBuildError("no vectors to index: materialize at least one source first")
    if len(np.unique(live_ids)) != n:
        raise IndexBuildError(f"vector id collisions among {n} chunks; report this as a bug")
    report = IndexReport(dimension=dimension, count=n)
    current = index_store.current()
    plan = _plan(current, live_ids, model_fingerprint, dimension, settings)

    if plan.mode == "unchanged":
        report.mode = "unchanged"
        m = current.manifest
        report.version, report.factory, report.nlist, report.nprobe = current.version, m["factory"], m["nlist"], m["nprobe"]
        report.recall_at_k, report.training_points = m["recall_at_k"], m.get("training_points", 0)
        report.index_bytes = current.index_file.stat().st_size
        report.seconds = time.perf_counter() - started
        return report, current

    index = None
    trained_count = trained_similarity = None
    if plan.mode == "incremental":
        index = read_index(current.index_file)
        added_vectors = _fetch(warehouse, model_fingerprint, plan.added, dimension)
        reason = retrain_reason(
            nlist=ivf_nlist(index),
            trained_count=int(current.manifest["trained_count"]),
            live_count=n,
            flat_would_be_ivf=choose_nlist(n, min_nlist=settings.min_nlist) > 0,
            trained_similarity=current.manifest.get("trained_similarity"),
            added_similarity=centroid_similarity(index, added_vectors),
            max_growth=settings.max_growth,
        )
        if reason is None:
            report.removed = remove_ids(index, plan.removed)
            if len(plan.added):
                add_vectors(index, plan.added, added_vectors)
            report.added = len(plan.added)
            report.mode = "incremental"
            trained_count = int(current.manifest["trained_count"])
            trained_similarity = current.manifest.get("trained_similarity")
            report.factory = current.manifest["factory"]
            report.training_points = int(current.manifest.get("training_points", 0))
        else:
            index, plan.reason = None, reason
    if index is None:
        report.mode, report.retrain_reason = "full", plan.reason
        report.factory = factory_string(n, settings.factory_template, min_nlist=settings.min_nlist)
        nlist = _nlist_of(report.factory)
        training_size = min(n, MAX_TRAINING_POINTS_PER_CENTROID * nlist) if nlist else 0
        if nlist and training_size < MIN_POINTS_PER_CENTROID * nlist:
            raise IndexBuildError(f"{n} vectors cannot train {nlist} lists (need {MIN_POINTS_PER_CENTROID} per list)")
        training = _fetch(warehouse, model_fingerprint, live_ids[sample_rows(n, training_size, seed=0)], dimension)
        index = build_index(report.factory, dimension, training)
        trained_count, trained_similarity = n, centroid_similarity(index, training)
        report.training_points = len(training)
        report.added = n
        for ids, vectors in _stream(warehouse, model_fingerprint, dimension):
            add_vectors(index, ids, vectors)
            progress("faiss_index", int(index.ntotal), n, "vectors")
    if int(index.ntotal) != n:
        raise CorpusChanged(f"index holds {index.ntotal} vectors but {n} chunks were live when the build started")

    queries = _fetch(warehouse, model_fingerprint, live_ids[sample_rows(n, min(n, settings.recall_queries), seed=1)], dimension)
    k = min(settings.recall_k, n)
    truth = exact_top_k(queries, _stream(warehouse, model_fingerprint, dimension), k)
    report.nprobe, report.recall_at_k = tune_nprobe(index, queries, truth, k=k, target_recall=settings.target_recall)
    report.nlist = ivf_nlist(index)

    with index_store.new_version() as scratch:
        write_index(index, scratch / "index.faiss")
        np.save(scratch / "ids.npy", live_ids)
        report.index_bytes = (scratch / "index.faiss").stat().st_size
        if live_snapshot(warehouse, model_fingerprint) != snapshot:
            raise CorpusChanged("another run changed the live chunks while the index was being built")
        published = index_store.publish(
            scratch,
            {
                "model_fingerprint": model_fingerprint,
                "dimension": dimension,
                "metric": "inner_product",
                "factory": report.factory,
                "factory_template": settings.factory_template,
                "min_nlist": settings.min_nlist,
                "nlist": report.nlist,
                "nprobe": report.nprobe,
                "count": n,
                "recall_at_k": report.recall_at_k,
                "recall_k": k,
                "target_recall": settings.target_recall,
                "recall_queries": settings.recall_queries,
                "nprobe_rule": NPROBE_RULE,
                "live_snapshot": dataclasses.asdict(snapshot),
                "tuned_to_recall": required_recall(settings.target_recall, len(queries), k),
                "training_points": report.training_points,
                "trained_count": trained_count,
                "trained_similarity": trained_similarity,
                "build_mode": report.mode,
                "ids": "ids.npy: sorted int64 vector ids = first 63 bits of chunk_id (chunks.vector_id)",
            },
        )
    report.version = published.version
    report.seconds = time.perf_counter() - started
    return report, published


@dataclass
class _Plan:
    mode: str  # unchanged | incremental | full
    reason: str = ""
    added: np.ndarray | None = None
    removed: np.ndarray | None = None


def _plan(current: PublishedIndex | None, live_ids: np.ndarray, fingerprint: str, dimension: int, settings: IndexSettings) -> _Plan:
    if current is None:
        return _Plan("full", "no index published yet")
    m = current.manifest
    for key, want in (
        ("model_fingerprint", fingerprint),
        ("dimension", dimension),
        ("factory_template", settings.factory_template),
        ("min_nlist", settings.min_nlist),
    ):
        if m.get(key) != want:
            return _Plan("full", f"{key} changed ({m.get(key)} -> {want})")
    ids_file = current.path / "ids.npy"
    if not ids_file.exists() or m.get("trained_count") is None:
        return _Plan("full", "published index has no id list")
    old_ids = np.load(ids_file)
    added = np.setdiff1d(live_ids, old_ids, assume_unique=True)
    removed = np.setdiff1d(old_ids, live_ids, assume_unique=True)
    same_tuning = (m.get("target_recall"), m.get("recall_k"), m.get("recall_queries"), m.get("nprobe_rule")) == (
        settings.target_recall, min(settings.recall_k, len(live_ids)), settings.recall_queries, NPROBE_RULE,
    )
    if not len(added) and not len(removed) and same_tuning:
        return _Plan("unchanged")
    return _Plan("incremental", added=added, removed=removed)


def _nlist_of(factory: str) -> int:
    head = factory.split(",")[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 0


def _live_ids(warehouse: WarehouseResource, model_fingerprint: str) -> np.ndarray:
    parts = [
        batch.column(0).to_numpy().astype(np.int64)
        for batch in warehouse.stream_arrow(
            f"SELECT e.vector_id {_LIVE_VECTORS} ORDER BY e.vector_id", [model_fingerprint], batch_rows=65536
        )
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _stream(warehouse: WarehouseResource, model_fingerprint: str, dimension: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in warehouse.stream_arrow(
        f"SELECT e.vector_id, e.vector {_LIVE_VECTORS} ORDER BY e.vector_id", [model_fingerprint], batch_rows=FETCH_BATCH
    ):
        yield batch.column(0).to_numpy().astype(np.int64), arrow_to_vectors(batch.column(1), dimension)


def _fetch(warehouse: WarehouseResource, model_fingerprint: str, ids: np.ndarray, dimension: int) -> np.ndarray:
    """Vectors of the given vector ids, in the order given."""
    out = np.empty((len(ids), dimension), dtype=np.float32)
    position = {int(v): i for i, v in enumerate(ids)}
    for start in range(0, len(ids), FETCH_BATCH):
        chunk = [int(v) for v in ids[start : start + FETCH_BATCH]]
        with warehouse.connect(read_only=True) as con:
            table = con.sql(
                "SELECT vector_id, vector FROM embeddings WHERE model_fingerprint = ? "
                "AND vector_id IN (SELECT unnest(?::BIGINT[]))",
                params=[model_fingerprint, chunk],
            ).to_arrow_table()
        if table.num_rows != len(chunk):
            raise CorpusChanged(f"{len(chunk) - table.num_rows} of {len(chunk)} vectors were deleted while the index was being built")
        vectors = arrow_to_vectors(table.column("vector"), dimension)
        for vid, vector in zip(table.column("vector_id").to_pylist(), vectors):
            out[position[vid]] = vector
    return out
