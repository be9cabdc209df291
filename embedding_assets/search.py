"""Search the published index: embed the query with the same model, search, map ids back to chunks."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np

from embedding_assets.core.ivf import read_index, set_nprobe
from resources.index_store import IndexStoreError, IndexStoreResource
from resources.model import EmbeddingModelResource
from resources.warehouse import WarehouseResource


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    doc_path: str
    source: str
    score: float
    text: str
    heading_path: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def search(
    query: str,
    k: int,
    *,
    model: EmbeddingModelResource,
    warehouse: WarehouseResource,
    index_store: IndexStoreResource,
) -> list[Hit]:
    """Top-k chunks of the published index for ``query`` (best first).

    Raises IndexStoreError when nothing is published or the index was built with another model.
    Hits whose chunk has been deleted since the index was published are left out.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    published = index_store.current()
    if published is None:
        raise IndexStoreError(f"no index published under {index_store.root}: run `embedding-pipeline materialize` first")
    fingerprint = model.model_fingerprint()
    if published.manifest["model_fingerprint"] != fingerprint:
        raise IndexStoreError(
            f"index {published.version} was built with model {published.manifest['model_fingerprint']}, "
            f"but the configured model is {fingerprint}: configure the same model (EMBEDDING_MODEL, "
            "EMBEDDING_DTYPE, EMBEDDING_MAX_SEQ_LENGTH) or rebuild the index"
        )
    index = _load(str(published.index_file))
    if published.manifest.get("nprobe"):
        set_nprobe(index, int(published.manifest["nprobe"]))
    vectors, _ = model.encode([query])
    scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    if not found:
        return []
    rows = warehouse.query_rows(
        """SELECT k.vector_id, k.chunk_id, d.relative_path, k.source, k.text, k.heading_path
           FROM chunks k JOIN documents d USING (doc_id) WHERE k.vector_id IN (SELECT unnest(?::BIGINT[]))""",
        [[i for i, _ in found]],
    )
    by_id = {row[0]: row for row in rows}
    return [
        Hit(chunk_id=r[1], doc_path=r[2], source=r[3], score=score, text=r[4], heading_path=json.loads(r[5] or "[]"))
        for vid, score in found
        if (r := by_id.get(vid)) is not None
    ]


@functools.lru_cache(maxsize=2)
def _load(path: str):
    return read_index(path)
