"""The service's API contract against a real uvicorn server, the real model, the real cache tiers and an
index built by the real pipeline on the fixture corpus: the OpenAI embeddings shape, search, health,
metrics, errors, limits, API keys, dynamic batching, and that the event loop never blocks."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.core.chunking import contextual_text
from embedding_assets.core.identity import embedding_cache_key, text_sha256
from embedding_assets.service import ServiceSettings
from tests.pipeline_support import QUERIES, make_pipeline
from tests.service_support import ServiceThread

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LIMITS = ServiceSettings(max_inputs=8, max_input_chars=2000, max_body_bytes=64 * 1024, max_k=20, index_poll_seconds=0.2)
KEY = "test-key-" + "9f3a" * 6


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, instance):
    pipeline = make_pipeline(tmp_path_factory.mktemp("service"), instance)
    pipeline.run_all()
    return pipeline


@pytest.fixture(scope="module")
def service(pipeline):
    server = ServiceThread(pipeline.resources, LIMITS).start()
    yield server
    server.stop()


def _vectors(answer) -> np.ndarray:
    return np.array([item["embedding"] for item in answer.json()["data"]], dtype=np.float32)


# ----------------------------------------------------------------------------------- /v1/embeddings


def test_embeddings_have_the_openai_shape_and_are_the_models_vectors(service, pipeline):
    texts = ["a lighthouse keeper trims the wick", "sourdough needs regular feeding", "chess endgames"]
    answer = service.post("/v1/embeddings", {"input": texts, "model": "all-MiniLM-L6-v2"})
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["object"] == "list" and body["model"] == pipeline.resources["model"].model
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in body["data"])
    vectors = _vectors(answer)
    assert vectors.shape == (3, pipeline.resources["model"].dimension())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    expected, _ = pipeline.resources["model"].encode(texts)
    assert (np.einsum("ij,ij->i", vectors, expected) > 0.999).all()  # same model, same order
    usage = body["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] >= 3 * 3  # each text: its tokens + [CLS] + [SEP]


def test_a_single_string_and_base64_give_the_same_vector_as_float(service):
    text = "rock pools at low tide"
    as_float = service.post("/v1/embeddings", {"input": text})
    as_b64 = service.post("/v1/embeddings", {"input": [text], "encoding_format": "base64"})
    assert as_float.status == as_b64.status == 200
    decoded = np.frombuffer(base64.b64decode(as_b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, _vectors(as_float)[0])
    assert len(as_float.json()["data"]) == 1


def test_a_chunk_the_pipeline_embedded_is_a_cache_hit(service, pipeline):
    # What the pipeline embedded is the chunk's contextual text (title and heading path, then the text).
    chunk, display, context = pipeline.rows("SELECT chunk_id, text, context FROM chunks ORDER BY chunk_id LIMIT 1")[0]
    text = contextual_text(context or "", display)
    stored = np.array(pipeline.rows("SELECT vector FROM embeddings WHERE chunk_id = ?", [chunk])[0][0],
                      dtype=np.float32)
    model_texts = service.metric("embedding_service_model_texts_total")
    hits = sum(service.metric(f'embedding_service_cache_hits_total{{tier="{t}"}}') for t in ("lru", "redis", "disk"))
    answer = service.post("/v1/embeddings", {"input": [text]})
    assert answer.status == 200
    np.testing.assert_array_equal(_vectors(answer)[0], stored)  # the very vector the pipeline stored
    assert service.metric("embedding_service_model_texts_total") == model_texts  # the model was not asked
    assert sum(service.metric(f'embedding_service_cache_hits_total{{tier="{t}"}}')
               for t in ("lru", "redis", "disk")) == hits + 1


def test_texts_the_service_embedded_go_into_the_pipelines_cache(service, pipeline):
    text = f"a sentence nobody embedded before {time.time_ns()}"
    assert service.post("/v1/embeddings", {"input": [text]}).status == 200
    model = pipeline.resources["model"]
    key = embedding_cache_key(model.model_fingerprint(), text_sha256(text))
    cached = pipeline.resources["cache"].get_many([key], model.dimension(), unit_norm=True)[0]
    assert cached is not None


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"input": ["x"], "encoding_format": "int8"}, 400, "unsupported_value"),
        ({"input": ["x"], "dimensions": 128}, 400, "unsupported_value"),
        ({"input": ["x"], "truncate": True}, 400, "unsupported_parameter"),
        ({"input": [[101, 2023]]}, 400, "unsupported_value"),
        ({"input": ["x"], "model": "text-embedding-3-large"}, 400, "model_not_found"),
        ({"input": []}, 422, "invalid_value"),
        ({"input": ["fine", "   "]}, 422, "invalid_value"),
        ({"input": {"text": "x"}}, 422, "invalid_value"),
        ({"model": "all-MiniLM-L6-v2"}, 422, "invalid_value"),
        ({"input": ["t"] * 9}, 413, "request_too_large"),
        ({"input": ["y" * 2001]}, 413, "request_too_large"),
    ],
)
def test_bad_embedding_requests_get_a_clear_4xx(service, body, status, code):
    answer = service.post("/v1/embeddings", body)
    assert answer.status == status, answer.body
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b'"just a string"', b"null"])
def test_malformed_json_is_a_400_never_a_500(service, raw):
    for path in ("/v1/embeddings", "/search"):
        answer = service.request("POST", path, raw=raw)
        assert answer.status == 400, (path, raw, answer.body)
        assert "JSON" in answer.json()["error"]["message"] or "empty" in answer.json()["error"]["message"]


def test_a_body_over_the_limit_is_a_413(service):
    answer = service.request("POST", "/v1/embeddings", raw=json.dumps({"input": ["z" * 70_000]}).encode())
    assert answer.status == 413
    assert "EMBEDDING_MAX_BODY_BYTES" in answer.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(service):
    assert service.get("/v2/nothing").json()["error"]["message"]
    answer = service.get("/v1/embeddings")
    assert answer.status == 405 and answer.json()["error"]


# ----------------------------------------------------------------------------------- /search


@pytest.mark.parametrize("case", QUERIES[:3], ids=lambda c: c["expected_path"])
def test_search_get_and_post_find_the_expected_document(service, case):
    source, path = case["expected_path"].split("/", 1)
    got = service.get("/search?" + __import__("urllib.parse").parse.urlencode({"q": case["query"], "k": 3}))
    posted = service.post("/search", {"query": case["query"], "k": 3})
    assert got.status == posted.status == 200
    for answer in (got, posted):
        body = answer.json()
        assert body["index_version"] == service.state.version.version
        top = body["hits"][0]
        assert (top["source"], top["doc_path"]) == (source, path)
        assert {"chunk_id", "source", "doc_path", "heading_path", "score", "text"} <= set(top)
        assert isinstance(top["heading_path"], list) and top["text"]
        assert len(body["hits"]) == 3 and [h["score"] for h in body["hits"]] == sorted(
            [h["score"] for h in body["hits"]], reverse=True)


def test_search_filters_by_source(service):
    body = service.post("/search", {"q": "water", "k": 5, "source": "beta"}).json()
    assert body["hits"] and all(hit["source"] == "beta" for hit in body["hits"])
    assert body["mode"] == "hybrid"  # the default mode is named in the answer, not echoed as null


@pytest.mark.parametrize("mode", ["vector", "lexical", "hybrid"])
def test_search_modes_and_chunks_answer_as_the_cli_search_does(service, pipeline, mode):
    from embedding_assets.search import search

    query = "how often should a sourdough starter be fed"
    for chunks in (False, True):
        body = service.post("/search", {"q": query, "k": 4, "mode": mode, "chunks": chunks}).json()
        assert body["mode"] == mode and body["chunks"] is chunks
        local = search(query, 4, model=pipeline.resources["model"], index_store=pipeline.resources["index_store"],
                       mode=mode, per_document=not chunks)
        assert [h["chunk_id"] for h in body["hits"]] == [h.chunk_id for h in local]
        assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in local], abs=1e-5)
        documents = [(h["source"], h["doc_path"]) for h in body["hits"]]
        if not chunks:
            assert len(documents) == len(set(documents))  # best chunk per document
    page = service.get(f"/?q=sourdough+starter&mode={mode}").body.decode()
    assert f'<option value="{mode}" selected>' in page and 'class="hit"' in page


def test_lexical_search_does_not_embed_the_query(service):
    before = service.metric("embedding_service_batch_requests_count")
    answer = service.get("/search?q=sourdough+starter+feeding&k=3&mode=lexical")
    assert answer.status == 200 and answer.json()["hits"]
    assert service.metric("embedding_service_batch_requests_count") == before


@pytest.mark.parametrize("query", ["?q=tides&mode=semantic", "?q=tides&chunks=maybe"])
def test_bad_mode_or_chunks_is_422_naming_the_parameter(service, query):
    answer = service.get("/search" + query)
    assert answer.status == 422, answer.body
    assert answer.json()["error"]["param"] in ("mode", "chunks")


@pytest.mark.parametrize("query", ["?k=3", "?q=%20%20&k=3", "?q=tides&k=0", "?q=tides&k=21", "?q=tides&k=abc",
                                   "?q=tides&k=2.5"])
def test_bad_search_parameters_are_422(service, query):
    answer = service.get("/search" + query)
    assert answer.status == 422, answer.body
    assert answer.json()["error"]["param"] in ("q", "k")


def test_unknown_search_parameters_are_400(service):
    answer = service.get("/search?q=tides&per_page=3")
    assert answer.status == 400 and "per_page" in answer.json()["error"]["message"]


# ----------------------------------------------------------------------------------- health, ready, metrics, page


def test_health_ready_and_metrics(service):
    assert service.get("/health").json() == {"status": "ok"}
    ready = service.get("/ready")
    assert ready.status == 200 and ready.json()["model_loaded"] and ready.json()["index_version"]
    service.get("/search?q=bees&k=1")
    text = service.get("/metrics").body.decode()
    assert 'embedding_service_requests_total{route="/search",method="GET",status="200"}' in text
    assert 'embedding_service_request_seconds_bucket{route="/search",le="+Inf"}' in text
    assert "embedding_service_batch_texts_bucket" in text and "embedding_service_batch_tokens_sum" in text
    assert f'embedding_service_index_version_info{{version="{service.state.version.version}"}} 1' in text
    assert "embedding_service_cache_misses_total" in text
    assert "q=bees" not in text  # no request text in label values


def test_the_page_renders_hits_server_side_and_escapes_the_query(service):
    answer = service.get("/?q=" + __import__("urllib.parse").parse.quote("<script>alert(1)</script> bees in winter"))
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.body.decode()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "winter-beekeeping.md" in html and 'class="hit"' in html
    assert "script-src" not in answer.headers["content-security-policy"]  # default-src 'none': no script at all
    assert service.get("/").status == 200


# ----------------------------------------------------------------------------------- batching and the event loop


def test_concurrent_requests_are_batched(service):
    before_batches = service.metric("embedding_service_batch_requests_count")
    before_requests = service.metric("embedding_service_batch_requests_sum")
    texts = [f"concurrent request number {i} about tide pools {time.time_ns()}" for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda t: service.post("/v1/embeddings", {"input": [t]}), texts))
    assert all(a.status == 200 for a in answers)
    batches = service.metric("embedding_service_batch_requests_count") - before_batches
    requests = service.metric("embedding_service_batch_requests_sum") - before_requests
    assert requests == 24
    assert batches < 24, "every request ran alone: nothing was batched"
    # Each answer is the vector of its own text (futures resolved to the right requests).
    model_vectors, _ = service.state.model.encode(texts)
    got = np.stack([_vectors(a)[0] for a in answers])
    assert (np.einsum("ij,ij->i", got, model_vectors) > 0.999).all()


def test_a_lone_request_never_waits_for_the_gathering_window_and_requests_on_their_way_are_batched(pipeline):
    """The batcher waits only for requests already being tokenized: with a 400 ms window, one request is
    answered in the time of its forward pass, and 12 sent together still share batches."""
    import asyncio

    from embedding_assets.service.batching import EmbeddingBatcher
    from embedding_assets.service.metrics import ServiceMetrics

    async def scenario():
        metrics = ServiceMetrics()
        batcher = EmbeddingBatcher(pipeline.resources["model"], pipeline.resources["cache"], metrics, max_wait_s=0.4,
                                   cache_writes=False)  # fmt: skip
        await batcher.start()
        await batcher.warm_up()
        try:
            lone = []
            for i in range(3):
                started = time.perf_counter()
                await batcher.embed([f"a lone question about tide pools {i} {time.time_ns()}"])
                lone.append(time.perf_counter() - started)
            before = metrics.batch_requests.count()
            together = [f"question {i} sent together about lighthouses {time.time_ns()}" for i in range(12)]
            results = await asyncio.gather(*(batcher.embed([t]) for t in together))
            return lone, metrics.batch_requests.count() - before, results, together
        finally:
            await batcher.close()

    lone, batches, results, together = asyncio.run(scenario())
    assert min(lone) < 0.2, f"a lone request waited for the window: {lone}"
    assert batches < 12, "requests on their way were not gathered into shared batches"
    model_vectors, _ = pipeline.resources["model"].encode(together)
    got = np.stack([r.vectors[0] for r in results])
    assert (np.einsum("ij,ij->i", got, model_vectors) > 0.999).all()


def test_the_event_loop_answers_while_a_large_batch_is_encoded(service):
    # 8 texts truncated at the model's 256 tokens: a batch of about 2,000 tokens, most of a second on 2 cores.
    long_texts = [" ".join(f"w{j}x{i}q" for j in range(230)) + f" {time.time_ns()}" for i in range(8)]

    def big_request():
        answer = service.post("/v1/embeddings", {"input": long_texts})
        return answer, time.perf_counter()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(big_request)
        time.sleep(0.15)  # the big request reaches the batcher
        started = time.perf_counter()
        health = service.get("/health")
        health_done = time.perf_counter()
        answer, big_done = big.result()
    assert answer.status == 200 and health.status == 200
    assert health_done < big_done, "the big batch finished first: nothing was measured"
    assert health_done - started < 0.25


# ----------------------------------------------------------------------------------- API keys


def test_api_keys_are_required_checked_and_never_logged(pipeline, caplog):
    settings = ServiceSettings(api_keys=(KEY, "second-key-" + "0" * 16), index_poll_seconds=0.2)
    assert KEY not in repr(settings)
    server = ServiceThread(pipeline.resources, settings).start()
    try:
        with caplog.at_level(logging.DEBUG):
            missing = server.post("/v1/embeddings", {"input": ["x"]})
            wrong = server.post("/v1/embeddings", {"input": ["x"]}, headers={"Authorization": f"Bearer {KEY}x"})
            basic = server.get("/search?q=bees", headers={"Authorization": f"Basic {KEY}"})
            right = server.post("/v1/embeddings", {"input": ["x"]}, headers={"Authorization": f"Bearer {KEY}"})
            second = server.get("/search?q=bees", headers={"Authorization": "Bearer second-key-" + "0" * 16})
            page = server.get("/?q=bees")
        assert missing.status == wrong.status == basic.status == page.status == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error"
        assert right.status == second.status == 200
        assert server.get("/health").status == 200 and server.get("/ready").status == 200
        assert KEY not in caplog.text and KEY not in wrong.body.decode()
    finally:
        server.stop()


# ----------------------------------------------------------------------------------- structure


def test_the_service_imports_neither_the_warehouse_nor_duckdb():
    code = ("import sys; import embedding_assets.service.app; "
            "bad = [m for m in ('resources.warehouse', 'duckdb') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
