"""The published index's tuning holds for text queries (issue 14): recall@10 of the binary layout against
exact float32 search, on short texts embedded by the model that the tuning never saw."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_assets.core import index_version as iv
from embedding_assets.core.identity import vector_id
from embedding_assets.core.ivf import exact_top_k, recall_at_k, sample_rows
from embedding_assets.stages.faiss_index import IndexSettings, build_and_publish
from resources import EmbeddingModelResource, IndexStoreResource, WarehouseResource
from tests.test_index_lifecycle import FP, add_rows
from tests.test_index_versions import _real_sentences

TUNING_QUERIES = 150
TARGET = 0.95


def _held_out_queries(sentences: list[str], tuned: set[int]) -> list[str]:
    """A run of 4-12 words, at least 3 fewer than the sentence, of each sentence of 8+ words the tuning did
    not sample (another seed than the tuning's): short text queries, never a whole row."""
    rng = np.random.default_rng(1234)
    out = []
    for row, sentence in enumerate(sentences):
        words = sentence.split()
        if row in tuned or len(words) < 8:
            continue
        length = int(rng.integers(4, min(12, len(words) - 3) + 1))
        start = int(rng.integers(0, len(words) - length + 1))
        out.append(" ".join(words[start: start + length]))
    return out


def _build(tmp_path, vectors: np.ndarray, sentences: list[str], model):
    home = str(tmp_path)
    warehouse, store = WarehouseResource(home=home), IndexStoreResource(home=home)
    ids = [vector_id(c) for c in add_rows(warehouse, 0, vectors, texts=sentences)]
    report, published = build_and_publish(
        warehouse, store, model_fingerprint=FP, dimension=vectors.shape[1],
        settings=IndexSettings(layout="binary", target_recall=TARGET, recall_queries=TUNING_QUERIES, min_nlist=4,
                               tuning_queries="text"),
        query_encoder=lambda texts: model.encode(texts)[0],
    )
    return np.asarray(ids), report, iv.IndexVersion.open(published.path, verify="full")


@pytest.mark.slow
def test_binary_layout_tuned_on_text_queries_keeps_recall_for_unseen_text_queries(tmp_path):
    sentences = _real_sentences()
    model = EmbeddingModelResource()
    real_vectors = np.asarray(model.encode(sentences)[0], dtype=np.float32)
    n = len(sentences)
    queries_text = _held_out_queries(sentences, set(sample_rows(n, TUNING_QUERIES, seed=1).tolist()))
    assert len(queries_text) >= 500
    queries, _ = model.encode(queries_text)
    # Short text queries sit away from every row (a corpus vector as query finds itself at cosine 1).
    exact_top1 = (queries @ real_vectors.T).max(axis=1)
    assert np.median(exact_top1) < 0.8, np.median(exact_top1)

    ids, report, version = _build(tmp_path, real_vectors, sentences, model)
    assert report.mode == "full" and report.nlist >= 4 and report.recall_at_k >= TARGET
    assert version.manifest["tuning_queries"] == "text" and version.manifest["tuning"]["tuning_queries"].startswith("text")
    truth = exact_top_k(queries, [(ids, real_vectors)], 10)
    recall = recall_at_k(version.search(queries, 10)[1], truth, 10)
    assert recall >= TARGET, (recall, version.nprobe, version.rescore_multiplier)

    # The recall the manifest reports (and the recall gate reads) is what unseen text queries get. (Tuned on
    # corpus vectors, the 60-page benchmark's index reported 0.962 while its text queries got 0.831.)
    assert abs(report.recall_at_k - recall) <= 0.03, (report.recall_at_k, recall)


def test_text_tuning_needs_the_model_encoder(tmp_path):
    """Text queries cannot be made without the model: a clear error, not a silent fall-back to corpus vectors."""
    from embedding_assets.core.ivf import IndexBuildError

    warehouse, store = WarehouseResource(home=str(tmp_path)), IndexStoreResource(home=str(tmp_path))
    with pytest.raises(IndexBuildError, match="query_encoder"):
        build_and_publish(warehouse, store, model_fingerprint=FP, dimension=16, settings=IndexSettings())
