"""IVF index lifecycle on a real warehouse: full build, incremental add/remove, retrain, unchanged, atomic publish."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from embedding_assets.core import index_version as iv
from embedding_assets.core.identity import chunk_id, vector_id
from embedding_assets.core.quantization import (
    calibration_ranges,
    quantize_binary,
    quantize_int8,
    ranges_from_bytes,
    ranges_to_bytes,
)
from embedding_assets.stages.faiss_index import IndexSettings, build_and_publish
from resources import IndexStoreResource, WarehouseResource
from resources.warehouse import insert_arrow, vectors_to_arrow

DIM = 32
FP = "model-test"


def clustered(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, DIM))
    x = x.astype(np.float32)
    faiss.normalize_L2(x)
    return x


def add_rows(warehouse: WarehouseResource, start: int, vectors: np.ndarray, texts: list[str] | None = None) -> list[str]:
    """Live canonical chunks with float vectors and their int8/binary codes, as stages 3-6 would write them;
    each chunk's text is ``texts[i]`` (the texts the vectors were embedded from), else its chunk id."""
    ids = [chunk_id("doc", f"text{start + i}", 0) for i in range(len(vectors))]
    with warehouse.connect() as con:
        stored = con.execute("SELECT ranges FROM quantization_ranges").fetchall()
        if not stored:  # calibrated once on the first vectors, then reused (as quantized_embeddings does)
            ranges = calibration_ranges(vectors)
            insert_arrow(con, "documents", {"doc_id": ["doc"], "source": ["synthetic"], "relative_path": ["doc.txt"]})
            insert_arrow(con, "quantization_ranges", {
                "model_fingerprint": [FP], "ranges": [ranges_to_bytes(ranges)], "dim": [vectors.shape[1]], "sample_size": [len(vectors)]})
        else:
            ranges = ranges_from_bytes(bytes(stored[0][0]), vectors.shape[1])
        insert_arrow(con, "quantized_embeddings", {
            "chunk_id": ids, "vector_id": [vector_id(c) for c in ids], "source": ["synthetic"] * len(ids),
            "model_fingerprint": [FP] * len(ids), "int8": [r.tobytes() for r in quantize_int8(vectors, ranges)],
            "ubinary": [r.tobytes() for r in quantize_binary(vectors)]})
        insert_arrow(con, "chunks", {
            "chunk_id": ids, "vector_id": [vector_id(c) for c in ids], "doc_id": ["doc"] * len(ids),
            "source": ["synthetic"] * len(ids), "ordinal": list(range(len(ids))), "text": ids if texts is None else list(texts),
            "text_sha256": ids, "token_count": [3] * len(ids),
        })
        insert_arrow(con, "chunk_dedup", {"chunk_id": ids, "source": ["synthetic"] * len(ids), "status": ["canonical"] * len(ids)})
        insert_arrow(con, "embeddings", {
            "chunk_id": ids, "vector_id": [vector_id(c) for c in ids], "source": ["synthetic"] * len(ids),
            "text_sha256": ids, "model_fingerprint": [FP] * len(ids), "vector": vectors_to_arrow(vectors),
        })
    return ids


def remove_rows(warehouse: WarehouseResource, ids: list[str]) -> None:
    with warehouse.connect() as con:
        for table in ("chunks", "chunk_dedup", "embeddings", "quantized_embeddings"):
            con.execute(f"DELETE FROM {table} WHERE chunk_id IN (SELECT unnest(?::VARCHAR[]))", [ids])


@pytest.fixture
def stores(tmp_path):
    return WarehouseResource(home=str(tmp_path)), IndexStoreResource(home=str(tmp_path), keep_versions=2)


def build(stores, **settings):
    """Synthetic vectors have no texts to make query texts of: tuned on the sampled rows' vectors."""
    warehouse, index_store = stores
    settings.setdefault("tuning_queries", "vectors")
    return build_and_publish(warehouse, index_store, model_fingerprint=FP, dimension=DIM, settings=IndexSettings(**settings))


@pytest.mark.slow
@pytest.mark.parametrize("layout", iv.LAYOUTS)
def test_lifecycle_full_incremental_retrain_unchanged(stores, layout):
    warehouse, index_store = stores
    centers = np.random.default_rng(0).standard_normal((40, DIM))
    first = add_rows(warehouse, 0, clustered(4000, 1, centers))

    report, published = build(stores, layout=layout)
    assert report.mode == "full" and report.nlist > 0 and report.count == 4000
    assert report.recall_at_k >= 0.95 and 1 <= report.nprobe <= report.nlist
    trained_on = published.manifest["trained_count"]

    # 10% new vectors, 5% removed: added and removed without retraining.
    new = add_rows(warehouse, 4000, clustered(400, 2, centers))
    remove_rows(warehouse, first[:200])
    report, published = build(stores, layout=layout)
    assert report.mode == "incremental" and report.added == 400 and report.removed == 200
    assert published.manifest["trained_count"] == trained_on
    version = iv.IndexVersion.open(published.path, verify="full")
    assert version.index.ntotal == version.count == version.chunks.num_rows == 4200
    assert iv.nlist_of(version.index) == report.nlist
    assert report.recall_at_k >= 0.95
    ids = set(np.load(published.path / "ids.npy").tolist())
    assert vector_id(new[0]) in ids and vector_id(first[0]) not in ids

    # Nothing changed: nothing is written, the same version stays current.
    again, same = build(stores, layout=layout)
    assert again.mode == "unchanged" and same.version == published.version

    # Growth past 2x the trained count: retrain.
    add_rows(warehouse, 10_000, clustered(5000, 3, centers))
    report, published = build(stores, layout=layout)
    assert report.mode == "full" and "2x" in report.retrain_reason
    assert published.manifest["trained_count"] == 9200


@pytest.mark.slow
def test_drift_triggers_retraining(stores):
    warehouse, _ = stores
    centers = np.random.default_rng(0).standard_normal((40, DIM))
    add_rows(warehouse, 0, clustered(4000, 1, centers))
    build(stores)
    elsewhere = np.random.default_rng(9).standard_normal((40, DIM)) * 3  # a new topic region
    add_rows(warehouse, 4000, clustered(1500, 4, elsewhere))
    report, _ = build(stores)
    assert report.mode == "full" and report.retrain_reason.startswith("drift")


def test_failed_build_keeps_previous_version(stores, monkeypatch):
    warehouse, index_store = stores
    centers = np.random.default_rng(0).standard_normal((40, DIM))
    add_rows(warehouse, 0, clustered(1000, 1, centers))
    _, published = build(stores)
    add_rows(warehouse, 1000, clustered(50, 2, centers))

    import embedding_assets.stages.faiss_index as stage

    def broken_write(index, path):
        path.write_bytes(b"half an index")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stage.iv, "write_index", broken_write)
    with pytest.raises(OSError):
        build(stores)
    current = index_store.current()
    assert current.version == published.version
    assert iv.IndexVersion.open(current.path, verify="full").index.ntotal == 1000
    assert not list((index_store.root / "staging").iterdir())  # no half-written version left behind
