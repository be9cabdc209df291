"""Search modes over one published version: vector, lexical (BM25 inside the version) and hybrid
(reciprocal-rank fusion), best chunk per document by default, chunk-level results on request."""

from __future__ import annotations

import pytest

from embedding_assets.search import SearchError, reciprocal_rank_fusion, search
from tests.pipeline_support import QUERIES, make_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, instance):
    pipeline = make_pipeline(tmp_path_factory.mktemp("modes"), instance)
    pipeline.run_all()
    return pipeline


def run(pipeline, query, k=5, **kwargs):
    return search(query, k, model=pipeline.resources["model"], index_store=pipeline.resources["index_store"], **kwargs)


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_every_known_item_query_finds_its_page_first(built, mode):
    for case in QUERIES:
        hits = run(built, case["query"], k=3, mode=mode)
        assert f"{hits[0].source}/{hits[0].doc_path}" == case["expected_path"], (mode, case)


def test_lexical_mode_finds_an_exact_rare_word(built):
    hits = run(built, "arcades", k=3, mode="lexical")  # a word that only the aqueducts page holds, once
    assert hits and hits[0].doc_path == "roman-aqueducts.html" and hits[0].score > 0
    assert run(built, "qwertyuiop zxcvbnm", mode="lexical") == []  # no shared word: no hits, no error


def test_results_are_one_chunk_per_document_unless_chunks_are_asked_for(built):
    query = "tide pools and rock pools on the shore"
    per_document = run(built, query, k=10)
    documents = [(h.source, h.doc_path) for h in per_document]
    assert len(documents) == len(set(documents))
    chunks = run(built, query, k=10, per_document=False)
    assert len({(h.source, h.doc_path) for h in chunks}) < len(chunks), "expected several chunks of one page"
    assert chunks[0].score >= per_document[0].score - 1e-6


def test_source_filter_and_bad_requests(built):
    hits = run(built, "feeding a starter", k=5, source="beta", mode="hybrid")
    assert hits and all(h.source == "beta" for h in hits)
    with pytest.raises(SearchError, match="unknown search mode"):
        run(built, "x", mode="semantic")
    with pytest.raises(SearchError, match="k must be"):
        run(built, "x", k=0)


def test_a_version_without_lexical_index_refuses_lexical_mode(built):
    built.run_index(index_config={"lexical": False})
    try:
        assert run(built, "arcades of an aqueduct", k=1)  # vector still works
        with pytest.raises(SearchError, match="no lexical index"):
            run(built, "arcades", mode="hybrid")
    finally:
        built.run_index()
    assert run(built, "arcades", mode="lexical")


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = reciprocal_rank_fusion([[(1, 0.9), (2, 0.8), (3, 0.7)], [(3, 9.0), (1, 5.0), (4, 1.0)]])
    assert [item for item, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
