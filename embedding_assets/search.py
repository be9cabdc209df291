"""Search the published index version: embed the query with the same model, search, read the hit rows.

Reads only the current index version (see ``embedding_assets.core.index_version``): no warehouse
connection and no lock, so no writer can delay a query. This module must not import the warehouse
(a structural test keeps it so).

Modes: ``vector`` (the FAISS index over the quantized codes), ``lexical`` (BM25 inside the version) and
``hybrid`` (both, fused by reciprocal-rank fusion with k = 60). Results are the best chunk per document
by default (``per_document=False`` returns chunks).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from embedding_assets.core.index_version import IndexVersion
from resources.index_store import IndexStoreError, IndexStoreResource
from resources.model import EmbeddingModelResource

MODES = ("vector", "lexical", "hybrid")
# Measured (benchmarks/retrieval.py, RESULTS.md "Retrieval quality"): hybrid finds the page in the top 10 for
# 99% of known-item queries against 85% for vector search over the binary index.
DEFAULT_MODE = "hybrid"
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al.; the usual default)
# Candidates fetched per hit wanted: per-document results and a source filter need more to fill k.
PER_DOCUMENT_OVERFETCH = 4
SOURCE_FILTER_OVERFETCH = 8
MIN_FUSION_CANDIDATES = 50
FETCH_GROWTH = 4  # when the candidates held fewer than k hits, fetch this many times more


class SearchError(ValueError):
    """A search request that cannot be answered as asked (bad k or mode); the message says why."""


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_path: str
    source: str
    score: float
    text: str
    heading_path: list[str]
    title: str | None = None
    page: int | None = None  # PDF page of the chunk's start

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def search(
    query: str,
    k: int,
    *,
    model: EmbeddingModelResource,
    index_store: IndexStoreResource,
    source: str | None = None,
    mode: str | None = None,
    per_document: bool = True,
) -> list[Hit]:
    """Top-k hits of the published version for ``query`` (best first), optionally of one ``source``.

    ``score`` is the inner product with the query (cosine) in ``vector`` mode, the BM25 score in
    ``lexical`` mode and the fused reciprocal-rank score in ``hybrid`` mode. ``mode=None`` is the default
    (``DEFAULT_MODE``, or ``vector`` on a version built without the lexical index).
    Raises IndexStoreError when nothing is published or the index was built with another model, and
    SearchError for k < 1, an unknown mode, or a lexical mode on a version without a lexical index.
    """
    check_request(k, mode)
    if mode == "lexical":
        version = index_store.open_current()
        return search_version(version, query, None, k, mode=mode, source=source, per_document=per_document)
    version = open_for_model(index_store, model.model_fingerprint())
    vectors, _ = model.encode([query])
    return search_version(version, query, vectors[0], k, mode=mode, source=source, per_document=per_document)


def check_request(k: int, mode: str | None) -> None:
    """SearchError for k < 1 or an unknown mode (before any work); None is the default mode."""
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    if mode is not None and mode not in MODES:
        raise SearchError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")


def open_for_model(index_store: IndexStoreResource, fingerprint: str) -> IndexVersion:
    """The published version, opened (cached per version), checked to hold vectors of ``fingerprint``.

    A caller that keeps the returned object keeps searching that version even after a newer one is
    published (the service holds it for one request). Raises IndexStoreError as ``search`` does.
    """
    version = index_store.open_current()
    if version.manifest["model_fingerprint"] != fingerprint:
        raise IndexStoreError(
            f"index {version.version} was built with model {version.manifest['model_fingerprint']}, "
            f"but the configured model is {fingerprint}: configure the same model (EMBEDDING_MODEL, "
            "EMBEDDING_DTYPE, EMBEDDING_MAX_SEQ_LENGTH) or rebuild the index"
        )
    return version


def resolve_mode(version: IndexVersion, mode: str | None) -> str:
    """The mode asked for, or for None the default: ``DEFAULT_MODE`` where the version has a lexical index,
    else ``vector`` (a version built with EMBEDDING_LEXICAL_INDEX=0 still answers default searches)."""
    if mode is not None:
        return mode
    return DEFAULT_MODE if version.has_lexical or DEFAULT_MODE == "vector" else "vector"


def search_version(version: IndexVersion, query: str, vector: np.ndarray | None, k: int, *,
                   mode: str | None = None, source: str | None = None, per_document: bool = True) -> list[Hit]:
    """Top-k hits of an opened ``version``: ``vector`` is the query's unit vector (dim,), needed by the
    vector and hybrid modes (None in lexical mode); ``query`` is the text, needed by lexical and hybrid.
    ``mode=None``: see ``resolve_mode``."""
    check_request(k, mode)
    mode = resolve_mode(version, mode)
    if mode != "vector" and not version.has_lexical:
        raise SearchError(f"index {version.version} has no lexical index: search with mode 'vector' or rebuild it")
    wanted = k * (PER_DOCUMENT_OVERFETCH if per_document else 1) * (SOURCE_FILTER_OVERFETCH if source else 1)
    # Candidates are chunks; k documents (or k chunks of one source) may need more of them than the first
    # guess when a few documents hold many of the best chunks: fetch more until k hits or every row was seen.
    while True:
        ranked, exhausted = _ranked(version, query, vector, wanted, mode)
        hits = _hits(version, ranked, k, source=source, per_document=per_document)
        if len(hits) >= k or exhausted or wanted >= version.count:
            return hits
        wanted *= FETCH_GROWTH


def _ranked(version: IndexVersion, query: str, vector: np.ndarray | None, wanted: int,
            mode: str) -> tuple[list[tuple[int, float]], bool]:
    """(row, score) of up to ``wanted`` candidates per ranking, best first, fused in hybrid mode; and whether
    every ranking returned fewer than asked (fetching more cannot find more)."""
    ranked: list[tuple[int, float]] = []
    fetch = max(wanted, MIN_FUSION_CANDIDATES) if mode == "hybrid" else wanted
    exhausted = True
    if mode in ("vector", "hybrid"):
        if vector is None:
            raise SearchError(f"mode {mode!r} needs the query vector")
        query_vector = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        scores, ids = version.search(query_vector, fetch)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        rows = version.rows_of([i for i, _ in found]) if found else []
        ranked = [(int(r), s) for r, (_, s) in zip(rows, found)]
        exhausted = len(found) < fetch
    if mode in ("lexical", "hybrid"):
        lexical_scores, lexical_rows = version.lexical_search(query, fetch)
        lexical = [(int(r), float(s)) for r, s in zip(lexical_rows, lexical_scores)]
        exhausted = exhausted and len(lexical) < fetch
        ranked = lexical if mode == "lexical" else reciprocal_rank_fusion([ranked, lexical])
    return ranked, exhausted


def reciprocal_rank_fusion(rankings: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked lists of (item, score) by reciprocal rank: sum of 1 / (k + rank), rank from 1.
    Returns (item, fused score), best first; ties by item for a stable order."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (item, _) in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda pair: (-pair[1], pair[0]))


def _hits(version: IndexVersion, ranked: list[tuple[int, float]], k: int, *, source: str | None,
          per_document: bool) -> list[Hit]:
    if not ranked:
        return []
    rows = version.chunk_rows([row for row, _ in ranked])
    hits, documents = [], set()
    for (_, score), r in zip(ranked, rows):
        if source is not None and r["source"] != source:
            continue
        document = (r["source"], r["doc_path"])
        if per_document:
            if document in documents:
                continue
            documents.add(document)
        hits.append(Hit(chunk_id=r["chunk_id"], doc_path=r["doc_path"], source=r["source"], score=score,
                        text=r["text"], heading_path=r["heading_path"], title=r.get("title"), page=r.get("page")))
        if len(hits) == k:
            break
    return hits
