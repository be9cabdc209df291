"""The trust boundary under the real graph: real model, real DuckDB, a real redis-server holding
crafted values, real rows of NaN in the warehouse."""

from __future__ import annotations

import logging

import dagster as dg
import numpy as np
import pytest
import redis

from embedding_assets.core.chunking import contextual_text
from embedding_assets.core.identity import embedding_cache_key
from embedding_assets.definitions import build_definitions
from embedding_assets.stages import embeddings as embeddings_stage
from resources import EmbeddingCacheResource
from resources.cache import encode_vector
from tests.pipeline_support import make_pipeline
from tests.test_cache_trust import forge

pytestmark = pytest.mark.slow

CACHE_LOGGER = "embedding_pipeline.cache"
SECRET = "pipeline-secret-" + "z" * 20


def with_cache(pipeline, **settings):
    """The same pipeline with another cache configuration (home and Redis as before unless given)."""
    settings.setdefault("home", str(pipeline.home))
    settings.setdefault("redis_retry_seconds", 0.5)
    pipeline.resources["cache"] = EmbeddingCacheResource(**settings)
    pipeline.defs = build_definitions(pipeline.resources)
    return pipeline


def stored(pipeline, source: str) -> dict[str, tuple[str, np.ndarray]]:
    rows = pipeline.rows(
        "SELECT chunk_id, text_sha256, vector FROM embeddings WHERE source = ? ORDER BY chunk_id", [source]
    )
    return {cid: (sha, np.asarray(v, dtype=np.float32)) for cid, sha, v in rows}


def model_vectors(pipeline, source: str) -> dict[str, np.ndarray]:
    rows = pipeline.rows(  # what the model reads: the chunk's context (title, heading path), then its text
        "SELECT chunk_id, text, context FROM chunks JOIN chunk_dedup x USING (chunk_id) "
        "WHERE chunks.source = ? AND x.status = 'canonical' ORDER BY chunk_id",
        [source],
    )
    vectors, _ = pipeline.resources["model"].encode([contextual_text(c or "", t) for _, t, c in rows])
    return {cid: v for (cid, _, _), v in zip(rows, vectors)}


def assert_all_are_the_models(pipeline, source: str) -> None:
    want = model_vectors(pipeline, source)
    got = stored(pipeline, source)
    rows = pipeline.rows("SELECT count(*) FROM embeddings WHERE source = ?", [source])[0][0]
    assert rows == len(got)  # exactly one vector per chunk
    assert sorted(got) == sorted(want)
    cosines = [float(got[c][1] @ want[c]) for c in want]
    assert min(cosines) > 0.999, min(cosines)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_invalid_rows_in_the_warehouse_are_repaired_by_the_next_run_bypassing_the_cache(tmp_path, instance, redis_server):
    pipeline = make_pipeline(tmp_path, instance, redis_url=redis_server.url)
    first = pipeline.run_source("beta")
    fingerprint = first["embeddings"]["model_fingerprint"]
    before = stored(pipeline, "beta")
    assert len(before) >= 4
    victims = sorted(before)[:4]
    # Four kinds of invalid rows, written straight into DuckDB (as an older version would have).
    with pipeline.warehouse.connect() as con:
        con.execute("UPDATE embeddings SET vector = list_transform(vector, lambda x: 'nan'::FLOAT) WHERE chunk_id = ?", [victims[0]])
        con.execute("UPDATE embeddings SET vector = list_transform(vector, lambda x: x * 3) WHERE chunk_id = ?", [victims[1]])
        con.execute("UPDATE embeddings SET vector = vector[1:100] WHERE chunk_id = ?", [victims[2]])
        con.execute("UPDATE embeddings SET vector = list_transform(vector, lambda x: 'inf'::FLOAT) WHERE chunk_id = ?", [victims[3]])
        # And int8 ranges no unit vector can produce (as a calibration on the scaled row would).
        con.execute("UPDATE quantization_ranges SET ranges = ? WHERE model_fingerprint = ?",
                    [np.full((2, 384), 3.0, dtype=np.float32).tobytes(), fingerprint])  # fmt: skip
    # The cache holds well-formed but wrong vectors for those texts: the repair must not read it.
    raw = redis.Redis.from_url(redis_server.url)
    for cid in victims:
        k = embedding_cache_key(fingerprint, before[cid][0])
        raw.set(k, forge(k, before[sorted(before)[-1]][1]))
    pipeline.resources["cache"].close()

    again = pipeline.run_source("beta")
    meta = again["embeddings"]
    assert meta["vectors_repaired"] == 4 and meta["embedded_by_model"] == 4
    assert meta["quantization_reset"] is True
    after = stored(pipeline, "beta")
    for cid in victims:
        assert float(after[cid][1] @ before[cid][1]) > 0.999  # the model's vector, not the cache's
    assert_all_are_the_models(pipeline, "beta")
    for cid in victims:  # and the cache now holds the right values again
        k = embedding_cache_key(fingerprint, before[cid][0])
        assert raw.get(k) == encode_vector(after[cid][1], k)
    ranges = pipeline.rows("SELECT ranges FROM quantization_ranges WHERE model_fingerprint = ?", [fingerprint])
    assert np.abs(np.frombuffer(ranges[0][0], dtype=np.float32)).max() <= 1.0
    codes = pipeline.rows("SELECT count(*) FROM quantized_embeddings WHERE source = 'beta'")[0][0]
    assert codes == len(after)

    third = pipeline.run_source("beta")["embeddings"]  # nothing left to repair
    assert third["vectors_repaired"] == 0 and third["quantization_reset"] is False and third["embedded_by_model"] == 0
    pipeline.run_index()  # the blocking vector checks pass and the index publishes


def _poison_redis_with_rotated_vectors(pipeline, raw, source: str, fingerprint: str, chunk_ids=None) -> int:
    """Each chosen text's Redis value becomes another text's real vector, correctly checksummed."""
    rows = stored(pipeline, source)
    chosen = sorted(chunk_ids if chunk_ids is not None else rows)
    vectors = [rows[c][1] for c in chosen]
    for i, cid in enumerate(chosen):
        k = embedding_cache_key(fingerprint, rows[cid][0])
        raw.set(k, forge(k, vectors[(i + 1) % len(vectors)]))
    return len(chosen)


def _forget_local_state(pipeline, source: str) -> None:
    """Drop the warehouse vectors and the local cache tiers: the next run reads Redis only."""
    with pipeline.warehouse.connect() as con:
        con.execute("DELETE FROM embeddings WHERE source = ?", [source])
    cache = pipeline.resources["cache"]
    cache.close()
    cache.disk_path.unlink()


def test_audit_catches_well_formed_vectors_of_other_text_and_distrusts_redis(tmp_path, instance, redis_server, caplog):
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    pipeline = make_pipeline(tmp_path, instance, redis_url=redis_server.url)
    first = pipeline.run_source("alpha")["embeddings"]
    fingerprint = first["model_fingerprint"]
    raw = redis.Redis.from_url(redis_server.url)
    n = _poison_redis_with_rotated_vectors(pipeline, raw, "alpha", fingerprint)
    _forget_local_state(pipeline, "alpha")
    caplog.clear()

    meta = pipeline.run_source("alpha")["embeddings"]  # default audit rate: 1%, at least one per batch
    assert meta["redis_status"] == "distrusted"
    assert meta["cache_audited"] >= 1 and meta["cache_audit_mismatches"] >= 1
    assert meta["embedded_by_model"] == n == meta["row_count"]  # every Redis hit re-embedded
    assert_all_are_the_models(pipeline, "alpha")
    assert len([r for r in caplog.records if "wrong vector" in r.getMessage()]) == 1
    # The run wrote the right vectors back over the forged ones.
    for cid, (sha, vector) in stored(pipeline, "alpha").items():
        k = embedding_cache_key(fingerprint, sha)
        assert raw.get(k) == encode_vector(vector, k)

    # The next run trusts Redis again, audits it, and it is now clean.
    _forget_local_state(pipeline, "alpha")
    clean = pipeline.run_source("alpha")["embeddings"]
    assert clean["redis_status"] == "ok" and clean["cache_audit_mismatches"] == 0
    # Every chunk served by Redis; the audited ones were re-embedded only to check them (not counted as embedded).
    assert clean["cache_hits_redis"] == n and clean["cache_audited"] >= 1 and clean["embedded_by_model"] == 0
    assert_all_are_the_models(pipeline, "alpha")


def test_a_mismatch_in_a_later_batch_redoes_what_earlier_batches_took_from_redis(tmp_path, instance, redis_server, monkeypatch):
    # Batches of 2: the corpus's "beta" source has 8 chunks at a 256-token model input (5 at the default
    # 384), enough for three batches.
    monkeypatch.setattr(embeddings_stage, "BATCH_CHUNKS", 2)  # several batches from the small corpus
    pipeline = make_pipeline(tmp_path, instance, redis_url=redis_server.url, max_seq_length=256)
    fingerprint = pipeline.run_source("beta")["embeddings"]["model_fingerprint"]
    ids = sorted(stored(pipeline, "beta"))
    assert len(ids) >= 6
    raw = redis.Redis.from_url(redis_server.url)
    _poison_redis_with_rotated_vectors(pipeline, raw, "beta", fingerprint, ids[4:6])  # the third batch only
    _forget_local_state(pipeline, "beta")
    # Audit every Redis hit so the first two batches certainly pass and the third certainly fails.
    with_cache(pipeline, redis_url=redis_server.url, audit_rate=1.0)

    meta = pipeline.run_source("beta")["embeddings"]
    assert meta["redis_status"] == "distrusted" and meta["cache_audit_mismatches"] == 2
    assert meta["redone_after_distrust"] == 4  # the two batches before it took all 4 from Redis
    # 4 audited in the clean batches + 2 in the poisoned one; after it nothing is read from Redis.
    assert meta["cache_audited"] == 6 and meta["cache_hits_redis"] == 6
    assert_all_are_the_models(pipeline, "beta")
    assert pipeline.rows("SELECT count(*) - count(DISTINCT chunk_id) FROM embeddings")[0][0] == 0


def test_with_a_secret_values_from_writers_without_it_are_never_used(tmp_path, instance, redis_server):
    pipeline = make_pipeline(tmp_path, instance, redis_url=redis_server.url)
    open_run = pipeline.run_source("alpha")["embeddings"]  # written with checksums only
    fingerprint = open_run["model_fingerprint"]
    raw = redis.Redis.from_url(redis_server.url)
    n = _poison_redis_with_rotated_vectors(pipeline, raw, "alpha", fingerprint)
    _forget_local_state(pipeline, "alpha")
    with_cache(pipeline, redis_url=redis_server.url, secret=SECRET, audit_rate=0.0)  # no audit: the HMAC alone

    meta = pipeline.run_source("alpha")["embeddings"]
    assert meta["cache_hits_redis"] == 0 and meta["cache_rejected_untrusted"] == n
    assert meta["embedded_by_model"] == n and meta["redis_status"] == "ok"
    assert_all_are_the_models(pipeline, "alpha")
    # What it wrote carries an HMAC a later run with the secret accepts.
    _forget_local_state(pipeline, "alpha")
    again = pipeline.run_source("alpha")["embeddings"]
    assert again["cache_hits_redis"] == n and again["embedded_by_model"] == 0
    assert_all_are_the_models(pipeline, "alpha")


def test_audit_rate_zero_turns_the_audit_off_and_local_hits_are_never_audited(tmp_path, instance, redis_server):
    pipeline = make_pipeline(tmp_path, instance, redis_url=redis_server.url)
    n = pipeline.run_source("alpha")["embeddings"]["row_count"]
    with pipeline.warehouse.connect() as con:
        con.execute("DELETE FROM embeddings WHERE source = 'alpha'")
    # The disk tier (local) serves every hit: no audit, no model work.
    local = pipeline.run_source("alpha")["embeddings"]
    assert local["cache_audited"] == 0 and local["embedded_by_model"] == 0
    assert local["cache_hits_disk"] + local["cache_hits_lru"] == n
    # Redis serves every hit, audit off: nothing re-embedded.
    _forget_local_state(pipeline, "alpha")
    with_cache(pipeline, redis_url=redis_server.url, audit_rate=0.0)
    off = pipeline.run_source("alpha")["embeddings"]
    assert off["cache_hits_redis"] == n and off["cache_audited"] == 0 and off["embedded_by_model"] == 0
    assert_all_are_the_models(pipeline, "alpha")
