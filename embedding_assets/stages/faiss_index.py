"""Stage 7, ``faiss_index``: a self-contained index version built from the quantized codes of one snapshot.

1. **One snapshot.** Under one read of the warehouse (one connection, the shared lock held only for that
   read) the live set is exported to a scratch Parquet file: per live canonical chunk with codes of the
   model, its vector id, chunk id, source, document path, heading path, title, text, int8 and binary
   codes, and the float32 vector (used only to measure recall, never served), plus the calibration
   ranges. Everything after that reads the scratch file, so writers are never waited for and whatever
   lands later goes into the next build. Chunks still waiting for codes are counted (``pending``).
2. **Lifecycle** against the published version:
   - *unchanged*: the live set's digest (count, vector ids, display metadata), the model and the
     settings match the current version and its files are intact: nothing is written.
   - *incremental*: the current version's trained quantizer still fits (same model, layout and
     settings; the count has not grown past 2x or shrunk below 1/2 of what it was trained on; added
     codes are not drifting away from the centroids): ``remove_ids`` / ``add_with_ids`` on its index.
   - *full*: the coarse quantizer is trained again on a sample of the codes and every code is added.
3. **Tuning**: nprobe (and for ``binary`` the rescore multiplier) are chosen on the version's own
   search code so that recall@10 against exact float32 search reaches the target with a sampling margin;
   among settings that reach it, the cheapest (``estimate_cost``). The tuning queries are text queries by
   default: headings and text fragments of sampled rows embedded by the model (``ivf.query_texts``), because
   corpus vectors as queries overstate recall for real queries (RESULTS.md, issue 14: tuned on corpus vectors
   the binary index kept recall@10 0.83 for text queries against 0.96 for corpus vectors).
4. **Publishing** through the index store: gates run first (``gate_snapshot`` before building,
   ``gate_index`` before publishing); at most one build runs at a time (the store's build lock).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedding_assets.core import index_version as iv
from embedding_assets.core.ivf import (
    MIN_POINTS_PER_CENTROID,
    QUERY_FRAGMENT_WORDS,
    IndexBuildError,
    choose_nlist,
    exact_top_k,
    query_texts,
    required_recall,
    retrain_reason,
    sample_rows,
    tune_search,
)
from embedding_assets.core.quantization import ranges_from_bytes
from embedding_assets.stages import ProgressFn, no_progress
from resources.index_store import IndexStoreResource, PublishedIndex
from resources.warehouse import WarehouseResource, arrow_to_vectors

MAX_TRAINING_POINTS_PER_CENTROID = 64  # FAISS: 39-256; k-means cost grows with it, quality hardly past 64
# How nprobe is tuned; an index tuned by another rule is re-tuned, not kept as is.
NPROBE_RULE = "cheapest (nprobe, rescore multiplier) with sample recall >= required_recall(target, queries, k, z=1.645)"
# What the tuning queries are (``IndexSettings.tuning_queries``):
# - text: ``ivf.query_texts`` of the sampled rows (seed 1) embedded by the model: where real queries land;
# - vectors: the sampled rows' own float32 vectors, own id left out (for vectors without texts, e.g.
#   synthetic ones; optimistic for text queries).
TUNING_QUERIES = {
    "text": f"model-embedded query_texts of the sampled rows, fragments of {QUERY_FRAGMENT_WORDS[0]}-{QUERY_FRAGMENT_WORDS[1]} words",
    "vectors": "the sampled rows' float32 vectors, own id left out",
}
RESCORE_MULTIPLIERS = (1, 2, 4, 8, 16, 32)
BATCH_ROWS = 8192
SNAPSHOT_FILE = "snapshot.parquet"
# The snapshot's columns (a backend that cannot infer Arrow types from SQL writes these).
SNAPSHOT_SCHEMA = pa.schema([
    ("vector_id", pa.int64()), ("chunk_id", pa.string()), ("source", pa.string()), ("doc_path", pa.string()),
    ("heading_path", pa.string()), ("title", pa.string()), ("text", pa.string()), ("page", pa.int32()),
    ("token_count", pa.int32()), ("int8", pa.binary()), ("ubinary", pa.binary()), ("vector", pa.list_(pa.float32())),
])  # fmt: skip

# The live set the index must hold: live canonical chunks with int8/binary codes of the model. Two `?`: the
# model fingerprint for the codes, then for the float32 vectors.
LIVE_SET = """
    FROM chunks k
    JOIN chunk_dedup x ON x.chunk_id = k.chunk_id AND x.status = 'canonical'
    JOIN quantized_embeddings q ON q.chunk_id = k.chunk_id AND q.model_fingerprint = ?
    JOIN embeddings e ON e.chunk_id = k.chunk_id AND e.model_fingerprint = ?
    JOIN documents d ON d.doc_id = k.doc_id
    LEFT JOIN (SELECT doc_id, max(title) AS title FROM cleaned_documents GROUP BY doc_id) c ON c.doc_id = k.doc_id"""


@dataclass(frozen=True)
class IndexSettings:
    layout: str = "binary"
    target_recall: float = 0.95
    recall_k: int = 10
    recall_queries: int = 200
    min_nlist: int = 8
    max_growth: float = 2.0  # retrain when the corpus grows past this multiple of the trained count
    lexical: bool = True  # a BM25 index of the rows inside the version (hybrid and lexical search)
    tuning_queries: str = "text"  # a key of TUNING_QUERIES; "text" needs the model's encoder at build time

    def __post_init__(self):
        if self.layout not in iv.LAYOUTS:
            raise IndexBuildError(f"index layout {self.layout!r} is not one of {', '.join(iv.LAYOUTS)} (EMBEDDING_INDEX_LAYOUT)")
        if not self.target_recall > 0.0:  # above 1 is allowed and unreachable: the recall gate then refuses
            raise IndexBuildError(f"target recall must be > 0, got {self.target_recall} (EMBEDDING_TARGET_RECALL)")
        if self.tuning_queries not in TUNING_QUERIES:
            raise IndexBuildError(f"tuning queries {self.tuning_queries!r} is not one of {', '.join(TUNING_QUERIES)}")
        if self.recall_queries < 1 or self.recall_k < 1 or self.min_nlist < 1:
            raise IndexBuildError("recall_queries, recall_k and min_nlist must be >= 1")

    def tuning(self, count: int) -> dict[str, Any]:
        """The settings a published version must share to be kept as is."""
        return {"layout": self.layout, "target_recall": self.target_recall, "recall_k": min(self.recall_k, count),
                "recall_queries": self.recall_queries, "min_nlist": self.min_nlist, "nprobe_rule": NPROBE_RULE,
                "tuning_queries": f"{self.tuning_queries}: {TUNING_QUERIES[self.tuning_queries]}", "lexical": self.lexical}


@dataclass
class IndexReport:
    mode: str = ""  # unchanged | incremental | full
    retrain_reason: str = ""
    layout: str = ""
    version: str = ""
    count: int = 0
    pending: int = 0  # live chunks still waiting for codes: they go into the next build
    added: int = 0
    removed: int = 0
    dimension: int = 0
    nlist: int = 0
    nprobe: int = 0
    rescore_multiplier: int = 1
    recall_at_k: float = 0.0
    training_points: int = 0
    index_bytes: int = 0
    version_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """The live set, exported in one read: ``path`` (Parquet, rows sorted by vector id) and its digest."""

    path: Path
    count: int
    digest: dict[str, int]
    ranges: np.ndarray
    pending: int

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        yield from pq.ParquetFile(self.path).iter_batches(batch_size=BATCH_ROWS, columns=columns)

    def vector_ids(self) -> np.ndarray:
        parts = [b.column(0).to_numpy().astype(np.int64) for b in self.batches(["vector_id"])]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


GateFn = Callable[..., None]
# Texts -> (n, dim) float32 unit vectors with the model the index is built for (the model resource's encode).
QueryEncoder = Callable[[list[str]], np.ndarray]


def _no_gate(*args, **kwargs) -> None:
    return None


def live_digest(con, model_fingerprint: str) -> dict[str, int]:
    """Count, XOR of vector ids, of a hash of display metadata and of a hash of the codes of the live set:
    equal digests mean a version built now would hold the same vectors and show the same chunks."""
    count, ids, meta, codes = con.execute(
        f"""SELECT count(*), coalesce(bit_xor(q.vector_id), 0),
                   coalesce(bit_xor({con.row_hash("k.heading_path", "d.relative_path", "coalesce(c.title, '')",
                                                  "coalesce(k.page, -1)")}), 0),
                   coalesce(bit_xor({con.row_hash("q.vector_id", "q.int8", "q.ubinary")}), 0) {LIVE_SET}""",
        [model_fingerprint, model_fingerprint],
    ).fetchall()[0]
    return {"count": int(count), "vector_ids": int(ids), "metadata": int(meta), "codes": int(codes)}


def pending_chunks(con, model_fingerprint: str) -> int:
    """Live canonical chunks without codes of the model yet (an ingest still on its way)."""
    return int(con.execute(
        """SELECT count(*) FROM chunks k JOIN chunk_dedup x ON x.chunk_id = k.chunk_id AND x.status = 'canonical'
           WHERE NOT EXISTS (SELECT 1 FROM quantized_embeddings q WHERE q.chunk_id = k.chunk_id AND q.model_fingerprint = ?)""",
        [model_fingerprint],
    ).fetchall()[0][0])


def take_snapshot(con, model_fingerprint: str, folder: Path) -> Snapshot:
    """Export the live set into ``folder/snapshot.parquet`` through ``con`` (one consistent read)."""
    rows = con.execute("SELECT ranges, dim FROM quantization_ranges WHERE model_fingerprint = ?", [model_fingerprint]).fetchall()
    row = rows[0] if rows else None
    digest = live_digest(con, model_fingerprint)
    pending = pending_chunks(con, model_fingerprint)
    if row is None or digest["count"] == 0:
        raise IndexBuildError(
            "no vectors to index: materialize at least one source first"
            + (f" ({pending} live chunks are still waiting for their embeddings)" if pending else "")
        )
    path = folder / SNAPSHOT_FILE
    con.write_parquet(
        f"""SELECT q.vector_id, k.chunk_id, k.source, d.relative_path AS doc_path, k.heading_path, c.title, k.text,
                   k.page::INTEGER AS page, k.token_count, q.int8, q.ubinary, e.vector {LIVE_SET} ORDER BY q.vector_id""",
        [model_fingerprint, model_fingerprint], path, schema=SNAPSHOT_SCHEMA, row_group_size=BATCH_ROWS,
    )
    count = pq.ParquetFile(path).metadata.num_rows
    if count != digest["count"]:  # cannot happen under the read lock; a bug if it does
        raise IndexBuildError(f"snapshot holds {count} rows, the digest {digest['count']}: report this as a bug")
    return Snapshot(path=path, count=count, digest=digest, ranges=ranges_from_bytes(bytes(row[0]), row[1]), pending=pending)


def build_and_publish(
    warehouse: WarehouseResource,
    index_store: IndexStoreResource,
    *,
    model_fingerprint: str,
    dimension: int,
    settings: IndexSettings,
    gate_snapshot: GateFn = _no_gate,
    gate_index: GateFn = _no_gate,
    progress: ProgressFn = no_progress,
    query_encoder: QueryEncoder | None = None,
) -> tuple[IndexReport, PublishedIndex]:
    """Build a version from one snapshot of the live set and publish it (or keep the current one if nothing changed).

    ``query_encoder`` embeds the tuning queries when ``settings.tuning_queries`` is ``"text"`` (then it is
    required: IndexBuildError without it); it must be the model of ``model_fingerprint``.

    ``gate_snapshot(snapshot_path, count)`` runs before anything is built and ``gate_index(manifest, count)`` before
    publishing; either raises to stop, and then the current version stays current.
    Raises IndexBuildError when there is nothing to index or the vectors cannot be indexed.
    """
    started = time.perf_counter()
    if settings.tuning_queries == "text" and query_encoder is None:
        raise IndexBuildError("tuning on text queries needs the model's encoder: pass query_encoder "
                              "(or IndexSettings(tuning_queries='vectors') for vectors without texts)")
    report = IndexReport(dimension=dimension, layout=settings.layout)
    # Nothing to do needs no lock and writes nothing (a read-only home can still confirm its index).
    kept = _unchanged_now(warehouse, index_store, model_fingerprint, dimension, settings)
    if kept is not None:
        with warehouse.connect(read_only=True) as con:
            report.pending = pending_chunks(con, model_fingerprint)
        _report_kept(report, kept)
        report.seconds = time.perf_counter() - started
        return report, kept
    with index_store.build_lock(), ExitStack() as stack:
        current = index_store.current(verify="full")
        work = stack.enter_context(index_store.scratch())
        with warehouse.connect(read_only=True) as con:
            digest = live_digest(con, model_fingerprint)
            kept = _unchanged(current, digest, model_fingerprint, dimension, settings)
            if kept is None:
                snapshot = take_snapshot(con, model_fingerprint, work)
            else:
                report.pending = pending_chunks(con, model_fingerprint)
        if kept is not None:
            _report_kept(report, kept)
            report.seconds = time.perf_counter() - started
            return report, kept
        report.count, report.pending = snapshot.count, snapshot.pending
        gate_snapshot(snapshot.path, snapshot.count)
        scratch = stack.enter_context(index_store.new_version())
        manifest = _build(snapshot, current, scratch, report, model_fingerprint, dimension, settings, progress,
                          query_encoder)
        gate_index(manifest, snapshot.count)
        published = index_store.publish(scratch, manifest)
    report.version = published.version
    report.version_bytes = sum(f["bytes"] for f in published.manifest.get("files", {}).values())
    report.seconds = time.perf_counter() - started
    return report, published


def _unchanged_now(warehouse, index_store, fingerprint, dimension, settings) -> PublishedIndex | None:
    current = index_store.current(verify="full")
    if current is None:
        return None
    with warehouse.connect(read_only=True) as con:
        digest = live_digest(con, fingerprint)
    return _unchanged(current, digest, fingerprint, dimension, settings)


def current_if_unchanged(
    warehouse: WarehouseResource,
    index_store: IndexStoreResource,
    *,
    model_fingerprint: str,
    dimension: int,
    settings: IndexSettings,
) -> PublishedIndex | None:
    """The published version when a build would change nothing, else None. One digest query: lets an
    orchestrator skip launching a no-op index run."""
    current = index_store.current()
    if current is None:
        return None
    with warehouse.connect(read_only=True) as con:
        digest = live_digest(con, model_fingerprint)
    return _unchanged(current, digest, model_fingerprint, dimension, settings)


def _unchanged(current: PublishedIndex | None, digest: dict[str, int], fingerprint: str, dimension: int,
               settings: IndexSettings) -> PublishedIndex | None:
    if current is None or current.fallback_from or digest["count"] == 0:
        return None
    m = current.manifest
    same = (
        m.get("model_fingerprint") == fingerprint
        and m.get("dimension") == dimension
        and m.get("digest") == digest
        and m.get("tuning") == settings.tuning(digest["count"])
    )
    return current if same else None


def _report_kept(report: IndexReport, kept: PublishedIndex) -> None:
    m = kept.manifest
    report.mode, report.version, report.count = "unchanged", kept.version, int(m["count"])
    report.nlist, report.nprobe, report.rescore_multiplier = m["nlist"], m["nprobe"], m.get("rescore_multiplier", 1)
    report.recall_at_k, report.training_points = m["recall_at_k"], m.get("training_points", 0)
    report.index_bytes = m["files"][iv.INDEX_FILE[m["layout"]]]["bytes"]
    report.version_bytes = sum(f["bytes"] for f in m["files"].values())


def _build(snapshot: Snapshot, current: PublishedIndex | None, scratch: Path, report: IndexReport,
           fingerprint: str, dimension: int, settings: IndexSettings, progress: ProgressFn,
           query_encoder: QueryEncoder | None = None) -> dict[str, Any]:
    n, layout, ranges = snapshot.count, settings.layout, snapshot.ranges
    if ranges.shape != (2, dimension):
        raise IndexBuildError(f"calibration ranges have shape {ranges.shape}, the model's dimension is {dimension}")
    live_ids = snapshot.vector_ids()
    if len(np.unique(live_ids)) != n:
        raise IndexBuildError(f"vector id collisions among {n} chunks; report this as a bug")

    index, added, trained = _incremental_start(snapshot, current, live_ids, report, fingerprint, dimension, settings)
    if index is None:
        report.mode = "full"
        nlist = choose_nlist(n, min_nlist=settings.min_nlist)
        index = iv.new_index(layout, dimension, nlist, ranges)
        training_size = min(n, MAX_TRAINING_POINTS_PER_CENTROID * nlist) if nlist else 0
        if nlist and training_size < MIN_POINTS_PER_CENTROID * nlist:
            raise IndexBuildError(f"{n} vectors cannot train {nlist} lists (need {MIN_POINTS_PER_CENTROID} per list)")
        if nlist:
            int8_sample, binary_sample = _codes_at(snapshot, sample_rows(n, training_size, seed=0), dimension)
            iv.train(index, layout, int8_sample, binary_sample, ranges)
            trained = {"trained_count": n, "trained_similarity": iv.centroid_fit(index, layout, int8_sample, binary_sample, ranges),
                       "training_points": training_size}
        else:
            trained = {"trained_count": n, "trained_similarity": None, "training_points": 0}
        added = None  # every row
        report.added = n
    report.training_points = int(trained["training_points"])

    # One pass over the snapshot: the version's row files, the codes the index still needs, and what the
    # tuning queries are made of (the sampled rows' vectors, or their headings and texts).
    text_queries = settings.tuning_queries == "text"
    query_rows = sample_rows(n, min(n, settings.recall_queries), seed=1)
    queries = np.empty((len(query_rows), dimension), dtype=np.float32)
    query_sources: list[tuple[str | None, str]] = []
    ids_out = np.lib.format.open_memmap(scratch / iv.IDS_FILE, mode="w+", dtype=np.int64, shape=(n,))
    hashes_out = np.lib.format.open_memmap(scratch / iv.CODE_HASHES_FILE, mode="w+", dtype=np.uint64, shape=(n,))
    int8_out = (np.lib.format.open_memmap(scratch / iv.INT8_FILE, mode="w+", dtype=np.int8, shape=(n, dimension))
                if layout == "binary" else None)
    position = 0
    with pa.ipc.new_file(str(scratch / iv.CHUNKS_FILE), iv.CHUNK_SCHEMA) as chunk_writer:
        for batch in snapshot.batches(["vector_id", "chunk_id", "source", "doc_path", "heading_path", "title", "text",
                                       "page", "int8", "ubinary", "vector"]):
            rows = len(batch)
            ids = batch.column("vector_id").to_numpy().astype(np.int64)
            int8_codes = _codes(batch.column("int8"), np.int8, dimension)
            binary_codes = _codes(batch.column("ubinary"), np.uint8, dimension // 8)
            ids_out[position: position + rows] = ids
            hashes_out[position: position + rows] = iv.code_hashes(int8_codes, binary_codes)
            if int8_out is not None:
                int8_out[position: position + rows] = int8_codes
            chunk_writer.write_batch(pa.record_batch(
                [batch.column(name) for name in iv.CHUNK_SCHEMA.names], schema=iv.CHUNK_SCHEMA))
            take = np.ones(rows, dtype=bool) if added is None else np.isin(ids, added, assume_unique=True)
            if take.any():
                iv.add(index, layout, ids[take], int8_codes[take], binary_codes[take], ranges)
            in_batch = (query_rows >= position) & (query_rows < position + rows)
            if in_batch.any() and text_queries:
                query_sources += [_heading_and_text(batch, int(row)) for row in query_rows[in_batch] - position]
            elif in_batch.any():
                queries[in_batch] = arrow_to_vectors(batch.column("vector"), dimension)[query_rows[in_batch] - position]
            position += rows
            progress("faiss_index", position, n, "vectors")
    ids_out.flush()
    hashes_out.flush()
    del ids_out, hashes_out
    if int8_out is not None:
        int8_out.flush()
        del int8_out
    np.save(scratch / iv.RANGES_FILE, ranges.astype(np.float32))
    iv.write_index(index, scratch / iv.INDEX_FILE[layout])
    vocabulary = iv.build_lexical(scratch, _lexical_texts(scratch)) if settings.lexical else 0

    if text_queries:
        queries, query_ids = _embed_queries(query_encoder, query_texts(query_sources, seed=1), dimension), None
        k = min(settings.recall_k, n)
    else:
        # A corpus vector's own vector would be a free hit and inflate recall (by ~1/k), so it is left out
        # of both lists: recall as an unseen query would see it.
        k = min(settings.recall_k, max(n - 1, 1))
        query_ids = np.load(scratch / iv.IDS_FILE, mmap_mode="r")[query_rows] if n > 1 else None
    truth = _without(exact_top_k(queries, _float_batches(snapshot, dimension), k + 1), query_ids, k)
    manifest: dict[str, Any] = {
        "format": iv.FORMAT,
        "layout": layout,
        "model_fingerprint": fingerprint,
        "dimension": dimension,
        "metric": "inner_product",
        "count": int(index.ntotal),  # the count gate compares it with the snapshot's rows
        "nlist": iv.nlist_of(index),
        "nprobe": 0,
        "rescore_multiplier": 1,
        "digest": snapshot.digest,
        "tuning": settings.tuning(n),
        "tuning_queries": settings.tuning_queries,
        "recall_k": k,
        "target_recall": settings.target_recall,
        "tuned_to_recall": required_recall(settings.target_recall, len(queries), k),
        "build_mode": report.mode,
        "retrain_reason": report.retrain_reason,
        "pending_chunks": snapshot.pending,
        "lexical": settings.lexical,
        "lexical_vocabulary": vocabulary,
        **trained,
    }
    version = iv.IndexVersion.open(scratch, {**manifest, "files": _sizes(scratch, layout)})
    manifest["nprobe"], manifest["rescore_multiplier"], manifest["recall_at_k"] = _tune(
        version, queries, query_ids, truth, k, settings)
    report.nlist, report.nprobe = manifest["nlist"], manifest["nprobe"]
    report.rescore_multiplier, report.recall_at_k = manifest["rescore_multiplier"], manifest["recall_at_k"]
    report.index_bytes = (scratch / iv.INDEX_FILE[layout]).stat().st_size
    return manifest


def _incremental_start(snapshot, current, live_ids, report, fingerprint, dimension, settings):
    """The current version's index with removed ids taken out, the ids still to add and its training
    facts — or ``(None, None, None)`` when a full build is needed (``report.retrain_reason`` says why)."""
    reason = _full_build_reason(current, fingerprint, dimension, settings)
    if reason is None and _ranges_changed(current, snapshot.ranges):
        reason = "the int8 calibration ranges changed (the corpus outgrew its calibration sample)"
    if reason is None:
        try:
            old_ids = np.load(current.path / iv.IDS_FILE)
            old_hashes = np.load(current.path / iv.CODE_HASHES_FILE)
            index = iv.read_index(current.path / iv.INDEX_FILE[settings.layout], settings.layout)
        except (OSError, ValueError, RuntimeError) as exc:
            reason = f"the current version cannot be read ({exc})"
    if reason is not None:
        report.retrain_reason = reason
        return None, None, None
    m = current.manifest
    # A vector rewritten under the same id (a repaired embedding) is replaced: removed, then added again.
    rewritten = _rewritten(snapshot, old_ids, old_hashes, snapshot.ranges.shape[1])
    added = np.union1d(np.setdiff1d(live_ids, old_ids, assume_unique=True), rewritten)
    removed = np.union1d(np.setdiff1d(old_ids, live_ids, assume_unique=True), rewritten)
    added_int8, added_binary = _codes_of(snapshot, added[: 10_000], snapshot.ranges.shape[1])
    reason = retrain_reason(
        nlist=iv.nlist_of(index),
        trained_count=int(m["trained_count"]),
        live_count=len(live_ids),
        flat_would_be_ivf=choose_nlist(len(live_ids), min_nlist=settings.min_nlist) > 0,
        trained_similarity=m.get("trained_similarity"),
        added_similarity=iv.centroid_fit(index, settings.layout, added_int8, added_binary, snapshot.ranges),
        max_growth=settings.max_growth,
        added_count=len(added),
    )
    if reason is not None:
        report.retrain_reason = reason
        return None, None, None
    report.mode = "incremental"
    report.removed = iv.remove(index, removed)
    report.added = len(added)
    trained = {key: m.get(key) for key in ("trained_count", "trained_similarity", "training_points")}
    trained["training_points"] = trained["training_points"] or 0
    return index, added, trained


def _heading_and_text(batch: pa.RecordBatch, row: int) -> tuple[str | None, str]:
    """A row's last heading (else its document's title) and its text, as ``query_texts`` reads them."""
    headings = json.loads(batch.column("heading_path")[row].as_py() or "[]")
    return (headings[-1] if headings else batch.column("title")[row].as_py()), batch.column("text")[row].as_py() or ""


def _embed_queries(encoder: QueryEncoder, texts: list[str], dimension: int) -> np.ndarray:
    vectors = np.ascontiguousarray(encoder(texts), dtype=np.float32)
    if vectors.shape != (len(texts), dimension):
        raise IndexBuildError(f"the query encoder returned shape {vectors.shape} for {len(texts)} texts, expected "
                              f"({len(texts)}, {dimension}): pass the encoder of the model the codes were made with")
    return vectors


def _rewritten(snapshot: Snapshot, old_ids: np.ndarray, old_hashes: np.ndarray, dimension: int) -> np.ndarray:
    """Ids in both the snapshot and the old version whose codes differ."""
    changed = []
    for batch in snapshot.batches(["vector_id", "int8", "ubinary"]):
        ids = batch.column("vector_id").to_numpy().astype(np.int64)
        at = np.minimum(np.searchsorted(old_ids, ids), max(len(old_ids) - 1, 0))
        kept = (old_ids[at] == ids) if len(old_ids) else np.zeros(len(ids), dtype=bool)
        if kept.any():
            new = iv.code_hashes(_codes(batch.column("int8"), np.int8, dimension)[kept],
                                 _codes(batch.column("ubinary"), np.uint8, dimension // 8)[kept])
            changed.append(ids[kept][new != old_hashes[at[kept]]])
    return np.concatenate(changed) if changed else np.zeros(0, dtype=np.int64)


def _full_build_reason(current: PublishedIndex | None, fingerprint: str, dimension: int, settings: IndexSettings) -> str | None:
    if current is None:
        return "no index published yet"
    if current.fallback_from:
        return f"the current version {current.fallback_from} is damaged"
    m = current.manifest
    for key, want in (("model_fingerprint", fingerprint), ("dimension", dimension), ("layout", settings.layout),
                      ("format", iv.FORMAT)):
        if m.get(key) != want:
            return f"{key} changed ({m.get(key)} -> {want})"
    if (m.get("tuning") or {}).get("min_nlist") != settings.min_nlist or m.get("trained_count") is None:
        return "index settings changed"
    return None


def _ranges_changed(current: PublishedIndex, ranges: np.ndarray) -> bool:
    """The int8 codes were recalibrated since ``current`` was built: its scalar quantizer no longer fits."""
    try:
        return not np.array_equal(np.load(current.path / iv.RANGES_FILE), ranges.astype(np.float32))
    except (OSError, ValueError):
        return True


def _without(found: np.ndarray, own_ids: np.ndarray | None, k: int) -> np.ndarray:
    """Each row of ``found`` without its query's own id, cut to k columns (padded with -1)."""
    if own_ids is None:
        return found[:, :k]
    out = np.full((len(found), k), -1, dtype=np.int64)
    for row, (ids, own) in enumerate(zip(found, own_ids)):
        kept = ids[ids != own][:k]
        out[row, : len(kept)] = kept
    return out


def _tune(version: iv.IndexVersion, queries: np.ndarray, query_ids: np.ndarray | None, truth: np.ndarray, k: int,
          settings: IndexSettings) -> tuple[int, int, float]:
    """(nprobe, rescore multiplier, recall) reaching the recall bar at the lowest estimated cost; when none
    reaches it, the most accurate setting (the recall gate then refuses to publish)."""
    nlist = iv.nlist_of(version.index)
    bar = required_recall(settings.target_recall, len(queries), k)
    multipliers = RESCORE_MULTIPLIERS if version.layout == "binary" else (1,)
    options = []
    for multiplier in multipliers:
        def search(nprobe: int, multiplier=multiplier) -> np.ndarray:
            version.set_search_params(nprobe=nprobe or None, rescore_multiplier=multiplier)
            return _without(version.search(queries, k + 1)[1], query_ids, k)

        nprobe, recall = tune_search(search, nlist, truth, k=k, target_recall=settings.target_recall, queries=len(queries))
        cost = iv.estimate_cost(version.layout, version.count, nlist, nprobe, k, multiplier)
        options.append((recall >= bar, -cost, recall, nprobe, multiplier))
        if recall >= bar and nprobe <= 1:
            break  # a larger multiplier cannot lower nprobe further
    feasible = [o for o in options if o[0]]
    best = max(feasible, key=lambda o: o[1]) if feasible else max(options, key=lambda o: o[2])
    return best[3], best[4], best[2]


def _sizes(folder: Path, layout: str) -> dict[str, dict[str, int]]:
    return {name: {"bytes": (folder / name).stat().st_size} for name in iv.files_of(layout)}


def _codes(column: pa.ChunkedArray | pa.Array, dtype, width: int) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, width), dtype=dtype)
    data = b"".join(column.to_pylist())
    if len(data) != len(column) * width:
        raise IndexBuildError(f"stored codes have {len(data) // max(len(column), 1)} bytes, expected {width}: "
                              "re-materialize quantized_embeddings")
    return np.frombuffer(data, dtype=dtype).reshape(len(column), width)


def _codes_at(snapshot: Snapshot, positions: np.ndarray, dimension: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 and binary codes of the snapshot rows at sorted ``positions``."""
    int8_parts, binary_parts, position = [], [], 0
    for batch in snapshot.batches(["int8", "ubinary"]):
        rows = len(batch)
        local = positions[(positions >= position) & (positions < position + rows)] - position
        if len(local):
            int8_parts.append(_codes(batch.column("int8"), np.int8, dimension)[local])
            binary_parts.append(_codes(batch.column("ubinary"), np.uint8, dimension // 8)[local])
        position += rows
    return _stack(int8_parts, np.int8, dimension), _stack(binary_parts, np.uint8, dimension // 8)


def _codes_of(snapshot: Snapshot, vector_ids: np.ndarray, dimension: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 and binary codes of the given vector ids (any order)."""
    int8_parts, binary_parts = [], []
    if len(vector_ids):
        for batch in snapshot.batches(["vector_id", "int8", "ubinary"]):
            take = np.isin(batch.column("vector_id").to_numpy(), vector_ids)
            if take.any():
                int8_parts.append(_codes(batch.column("int8"), np.int8, dimension)[take])
                binary_parts.append(_codes(batch.column("ubinary"), np.uint8, dimension // 8)[take])
    return _stack(int8_parts, np.int8, dimension), _stack(binary_parts, np.uint8, dimension // 8)


def _stack(parts: list[np.ndarray], dtype, width: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, width), dtype=dtype)


def _lexical_texts(scratch: Path) -> Iterator[list[str]]:
    """The version's rows as the lexical index reads them, in row order, a batch at a time."""
    reader = pa.ipc.open_file(pa.memory_map(str(scratch / iv.CHUNKS_FILE), "r"))
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        yield [iv.lexical_text(t, h, x) for t, h, x in zip(batch.column("title").to_pylist(),
               batch.column("heading_path").to_pylist(), batch.column("text").to_pylist())]


def _float_batches(snapshot: Snapshot, dimension: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in snapshot.batches(["vector_id", "vector"]):
        yield batch.column("vector_id").to_numpy().astype(np.int64), arrow_to_vectors(batch.column("vector"), dimension)


def describe(manifest: dict[str, Any]) -> str:
    """One line about a version for logs: layout, count, nlist, nprobe, recall."""
    return json.dumps({k: manifest.get(k) for k in ("version", "layout", "count", "nlist", "nprobe", "rescore_multiplier", "recall_at_k")})
