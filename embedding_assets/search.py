"""Search the published index version: embed the query with the same model, search, read the hit rows.

Reads only the current index version (see ``embedding_assets.core.index_version``): no warehouse
connection and no lock, so no writer can delay a query. This module must not import the warehouse
(a structural test keeps it so).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from embedding_assets.core.index_version import IndexVersion
from resources.index_store import IndexStoreError, IndexStoreResource
from resources.model import EmbeddingModelResource

# Hits are filtered by source after retrieval: fetch this many times k so a filter still fills k.
SOURCE_FILTER_OVERFETCH = 8


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_path: str
    source: str
    score: float
    text: str
    heading_path: list[str]
    title: str | None = None
    page: int | None = None  # set when the chunk map has a page column (PDF sources)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def search(
    query: str,
    k: int,
    *,
    model: EmbeddingModelResource,
    index_store: IndexStoreResource,
    source: str | None = None,
) -> list[Hit]:
    """Top-k chunks of the published index for ``query`` (best first), optionally of one ``source``.

    Raises IndexStoreError when nothing is published or the index was built with another model, and
    ValueError for k < 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    version = open_for_model(index_store, model.model_fingerprint())
    vectors, _ = model.encode([query])
    return search_vector(version, vectors[0], k, source=source)


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


def search_vector(version: IndexVersion, vector: np.ndarray, k: int, *, source: str | None = None) -> list[Hit]:
    """Top-k chunks of ``version`` for one unit query vector (dim,), best first, optionally of one ``source``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    fetch = k * SOURCE_FILTER_OVERFETCH if source else k
    scores, ids = version.search(np.ascontiguousarray(np.asarray(vector)[None, :], dtype=np.float32), fetch)
    found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    if not found:
        return []
    rows = version.chunk_rows(version.rows_of([i for i, _ in found]))
    hits = [
        Hit(chunk_id=r["chunk_id"], doc_path=r["doc_path"], source=r["source"], score=score, text=r["text"],
            heading_path=r["heading_path"], title=r.get("title"), page=r.get("page"))
        for (_, score), r in zip(found, rows)
        if source is None or r["source"] == source
    ]
    return hits[:k]
