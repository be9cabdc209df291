"""EmbeddingCacheResource against a real redis-server, real SQLite files and real processes."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import redis

from embedding_assets.core.identity import embedding_cache_key, fingerprint, text_sha256
from resources.cache import (
    EmbeddingCacheConfigError,
    EmbeddingCacheResource,
    EmbeddingCacheValueError,
    decode_vector,
    encode_vector,
    mask_redis_url,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 8
MODEL_A = fingerprint("model", {"name": "model-a", "dim": DIM})
MODEL_B = fingerprint("model", {"name": "model-b", "dim": DIM})
CACHE_LOGGER = "embedding_pipeline.cache"


def key(text: str, model: str = MODEL_A) -> str:
    return embedding_cache_key(model, text_sha256(text))


def vec(seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


@pytest.fixture
def make_cache(tmp_path):
    """Build caches under a per-test home; drop their process tiers afterwards."""
    made: list[EmbeddingCacheResource] = []

    def make(**settings) -> EmbeddingCacheResource:
        settings.setdefault("home", str(tmp_path / "home"))
        cache = EmbeddingCacheResource(**settings)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def cache_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == CACHE_LOGGER and r.levelno >= logging.WARNING]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(code: str, stdin: bytes = b"") -> dict:
    """Run code in a fresh interpreter (the repo on sys.path); it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, env=env, timeout=60, cwd=REPO_ROOT
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


# --------------------------------------------------------------------------- value codec


def test_encode_decode_round_trip_is_exact_float32():
    vector = vec(1)
    blob = encode_vector(vector, key("a"))
    assert blob[:4] == b"EMB2" and len(blob) == 12 + 4 * DIM + 16  # header, payload, 16-byte checksum
    decoded = decode_vector(blob, DIM, key("a"))
    assert decoded.dtype == np.float32 and decoded.shape == (DIM,)
    np.testing.assert_array_equal(decoded, vector)
    np.testing.assert_array_equal(decode_vector(encode_vector(np.arange(3), "k"), 3, "k"), [0.0, 1.0, 2.0])
    with_secret = encode_vector(vector, key("a"), secret=b"s" * 32)
    assert len(with_secret) == 12 + 4 * DIM + 32  # HMAC-SHA256
    np.testing.assert_array_equal(decode_vector(with_secret, DIM, key("a"), secret=b"s" * 32), vector)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda b: b"XXXX" + b[4:], id="wrong-magic"),
        pytest.param(lambda b: b[:-3], id="truncated"),
        pytest.param(lambda b: b[:8], id="header-only-part"),
        pytest.param(lambda b: b + b"\0\0\0\0", id="trailing-bytes"),
        pytest.param(lambda b: b[:4] + b"\x02" + b[5:], id="wrong-dtype-code"),
        pytest.param(lambda b: b[:5] + b"\x07" + b[6:], id="unknown-tag-kind"),
        pytest.param(lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], id="one-payload-bit-flipped"),
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 0x80]), id="one-checksum-bit-flipped"),
        pytest.param(lambda b: b"EMB1\x01\0\0\0" + b[8:12 + 4 * DIM], id="first-format-without-tag"),
        pytest.param(lambda b: pickle.dumps(np.zeros(DIM, np.float32)), id="pickle"),
        pytest.param(lambda b: "text", id="not-bytes"),
    ],
)
def test_decode_rejects_malformed_values(mangle):
    assert decode_vector(mangle(encode_vector(vec(2), key("b"))), DIM, key("b")) is None


def test_decode_rejects_other_dimension_other_key_and_encode_rejects_bad_vectors():
    assert decode_vector(encode_vector(vec(3, dim=4), key("c")), DIM, key("c")) is None
    assert decode_vector(encode_vector(vec(3), key("c")), DIM, key("d")) is None
    assert decode_vector(encode_vector(vec(3), key("c", MODEL_A)), DIM, key("c", MODEL_B)) is None
    for bad in [np.zeros((2, 4)), np.zeros(0), np.array([1.0, np.nan]), np.array([np.inf]), np.array(["a"])]:
        with pytest.raises(EmbeddingCacheValueError):
            encode_vector(bad, key("c"))


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"redis_url": "http://127.0.0.1:6379"}, "redis_url"),
        ({"redis_url": "127.0.0.1:6379"}, "redis_url"),
        ({"redis_url": "redis://127.0.0.1:notaport"}, "redis_url"),
        ({"redis_url": "redis://127.0.0.1:6379/zero"}, "redis_url"),
        ({"redis_url": "redis://127.0.0.1:6379/0?socket_timeout=soon"}, "redis_url"),
        ({"lru_entries": -1}, "lru_entries"),
        ({"redis_timeout_ms": 0}, "redis_timeout_ms"),
        ({"redis_retry_seconds": -1.0}, "redis_retry_seconds"),
        ({"redis_ttl_seconds": 0}, "redis_ttl_seconds"),
        ({"home": ""}, "home"),
    ],
)
def test_invalid_settings_fail_at_construction_naming_the_setting(tmp_path, settings, named):
    with pytest.raises(EmbeddingCacheConfigError, match=named):
        EmbeddingCacheResource(**{"home": str(tmp_path), **settings})


def test_env_bound_url_is_resolved_and_checked_at_first_use(tmp_path, monkeypatch, redis_server):
    monkeypatch.setenv("TEST_CACHE_REDIS_URL", "http://:hunter2secret@127.0.0.1:6379")
    cache = EmbeddingCacheResource(home=str(tmp_path), redis_url=dg.EnvVar("TEST_CACHE_REDIS_URL"))
    with pytest.raises(EmbeddingCacheConfigError, match="redis_url") as raised:
        cache.get_many([key("x")], DIM)
    assert "hunter2secret" not in str(raised.value)

    monkeypatch.delenv("TEST_CACHE_REDIS_URL")
    with pytest.raises(EmbeddingCacheConfigError, match="TEST_CACHE_REDIS_URL.*not set"):
        cache.get_many([key("x")], DIM)

    monkeypatch.setenv("TEST_CACHE_REDIS_URL", redis_server.url)
    cache.set_many([(key("x"), vec(1))])
    assert cache.stats()["redis_status"] == "ok"
    assert redis.Redis.from_url(redis_server.url).get(key("x")) == encode_vector(vec(1), key("x"))
    cache.close()


def test_mask_redis_url_hides_every_password_spelling():
    assert mask_redis_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_redis_url("rediss://alice:s3cret@host:6380/1") == "rediss://alice:***@host:6380/1"
    assert "s3cret" not in mask_redis_url("redis://host:6379/0?password=s3cret")
    assert "s3cret" not in mask_redis_url("redis://s3cret@host")
    assert mask_redis_url("redis://host:6379/0") == "redis://host:6379/0"
    assert mask_redis_url(None) is None


# --------------------------------------------------------------------------- tiers


def test_lru_round_trip_and_eviction_keeps_recently_used(make_cache):
    cache = make_cache(lru_entries=2, disk_enabled=False)
    k1, k2, k3 = key("one"), key("two"), key("three")
    cache.set_many([(k1, vec(1)), (k2, vec(2))])
    assert cache.get_many([k1], DIM)[0] is not None  # k1 is now the most recently used
    cache.set_many([(k3, vec(3))])
    got = cache.get_many([k1, k2, k3], DIM)
    np.testing.assert_array_equal(got[0], vec(1))
    assert got[1] is None
    np.testing.assert_array_equal(got[2], vec(3))
    stats = cache.stats()
    assert (stats["lru_hits"], stats["misses"], stats["lru_size"]) == (3, 1, 2)
    assert stats["redis_status"] == "disabled"
    with pytest.raises(ValueError):
        got[0][0] = 1.0  # shared LRU vectors are read-only


def test_caller_mutating_its_array_after_set_does_not_change_the_cache(make_cache):
    cache = make_cache(disk_enabled=False)
    vector = vec(1)
    cache.set_many([(key("mine"), vector)])
    vector[:] = 0.0
    np.testing.assert_array_equal(cache.get_many([key("mine")], DIM)[0], vec(1))


def test_lru_is_shared_by_instances_with_the_same_settings(make_cache):
    writer = make_cache(disk_enabled=False)
    writer.set_many([(key("shared"), vec(4))])
    same = make_cache(disk_enabled=False)
    np.testing.assert_array_equal(same.get_many([key("shared")], DIM)[0], vec(4))
    assert same.stats()["lru_hits"] == 1
    other = make_cache(disk_enabled=False, lru_entries=10)
    assert other.get_many([key("shared")], DIM) == [None]


def test_disk_round_trip_back_fills_lru(make_cache):
    cache = make_cache()
    keys = [key(f"text {i}") for i in range(5)]
    cache.set_many([(k, vec(i)) for i, k in enumerate(keys)])
    assert cache.disk_path.exists()
    cache.close()  # forget the LRU: the next read must come from disk

    got = cache.get_many(keys + [key("never written")], DIM)
    for i in range(5):
        np.testing.assert_array_equal(got[i], vec(i))
    assert got[5] is None
    assert (cache.stats()["disk_hits"], cache.stats()["misses"]) == (5, 1)
    assert cache.stats()["hits"] == {"lru": 0, "redis": 0, "disk": 5}

    cache.reset_stats()
    cache.get_many(keys, DIM)
    assert (cache.stats()["lru_hits"], cache.stats()["disk_hits"]) == (5, 0)


def test_redis_round_trip_back_fills_lru(make_cache, redis_server):
    cache = make_cache(redis_url=redis_server.url, disk_enabled=False)
    keys = [key(f"redis {i}") for i in range(4)]
    cache.set_many([(k, vec(i)) for i, k in enumerate(keys)])
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.get(keys[0]) == encode_vector(vec(0), keys[0])
    cache.close()

    got = cache.get_many(keys, DIM)
    for i in range(4):
        np.testing.assert_array_equal(got[i], vec(i))
    assert cache.stats()["redis_hits"] == 4 and cache.stats()["redis_status"] == "ok"
    cache.reset_stats()
    cache.get_many(keys, DIM)
    assert (cache.stats()["lru_hits"], cache.stats()["redis_hits"]) == (4, 0)


def test_disk_hit_back_fills_redis(make_cache, redis_server):
    disk_only = make_cache()
    disk_only.set_many([(key("on disk"), vec(7))])
    both = make_cache(redis_url=redis_server.url, redis_ttl_seconds=600)
    np.testing.assert_array_equal(both.get_many([key("on disk")], DIM)[0], vec(7))
    assert both.stats()["disk_hits"] == 1
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.get(key("on disk")) == encode_vector(vec(7), key("on disk"))
    assert 0 < raw.ttl(key("on disk")) <= 600


def test_model_fingerprints_never_read_each_others_vectors(make_cache, redis_server):
    cache = make_cache(redis_url=redis_server.url)
    text = "the same chunk text"
    cache.set_many([(key(text, MODEL_A), vec(10))])
    assert cache.get_many([key(text, MODEL_B)], DIM) == [None]
    cache.set_many([(key(text, MODEL_B), vec(11))])
    for fresh in (False, True):
        if fresh:
            cache.close()
        got = cache.get_many([key(text, MODEL_A), key(text, MODEL_B)], DIM)
        np.testing.assert_array_equal(got[0], vec(10))
        np.testing.assert_array_equal(got[1], vec(11))


# --------------------------------------------------------------------------- corrupt values

CORRUPTIONS = {
    "wrong-magic": lambda good: b"EMB0" + good[4:],
    "truncated": lambda good: good[:-4],
    "wrong-dim": lambda good: encode_vector(vec(99, dim=DIM + 1), key("corrupt")),
    "other-key": lambda good: encode_vector(vec(99), key("another text")),
    "nan": lambda good: good[:12] + np.full(DIM, np.nan, "<f4").tobytes() + good[12 + 4 * DIM :],
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_redis_value_is_a_miss_and_is_overwritten(make_cache, redis_server, corruption):
    cache = make_cache(redis_url=redis_server.url, disk_enabled=False)
    k = key("corrupt in redis")
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(k, CORRUPTIONS[corruption](encode_vector(vec(5), k)))

    assert cache.get_many([k], DIM) == [None]
    assert (cache.stats()["corrupt"], cache.stats()["misses"]) == (1, 1)
    cache.set_many([(k, vec(5))])
    assert raw.get(k) == encode_vector(vec(5), k)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_disk_value_is_a_miss_and_is_overwritten(make_cache, corruption):
    cache = make_cache()
    k = key("corrupt on disk")
    cache.set_many([(key("other"), vec(1))])  # creates the database file
    with sqlite3.connect(cache.disk_path) as db:
        bad_value = CORRUPTIONS[corruption](encode_vector(vec(6), k))
        db.execute("INSERT INTO embeddings VALUES (?, ?)", (k, bad_value))

    assert cache.get_many([k], DIM) == [None]
    assert cache.stats()["corrupt"] == 1
    cache.set_many([(k, vec(6))])
    with sqlite3.connect(cache.disk_path) as db:
        (stored,) = db.execute("SELECT value FROM embeddings WHERE key = ?", (k,)).fetchone()
    assert stored == encode_vector(vec(6), k)


def test_corrupt_redis_value_falls_through_to_disk_and_is_repaired(make_cache, redis_server):
    cache = make_cache(redis_url=redis_server.url)
    k = key("repaired")
    cache.set_many([(k, vec(8))])
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(k, b"EMB1garbage")
    cache.close()
    np.testing.assert_array_equal(cache.get_many([k], DIM)[0], vec(8))
    assert (cache.stats()["corrupt"], cache.stats()["disk_hits"]) == (1, 1)
    assert raw.get(k) == encode_vector(vec(8), k)


# --------------------------------------------------------------------------- other processes

READ_IN_CHILD = """
import json, pickle, sys
cache = pickle.loads(sys.stdin.buffer.read())
keys, dim = {keys!r}, {dim}
got = cache.get_many(keys, dim)
print(json.dumps({{"vectors": [None if v is None else v.tolist() for v in got], "stats": cache.stats()}}))
"""


def test_second_process_reads_vectors_through_redis(make_cache, redis_server, tmp_path):
    writer = make_cache(redis_url=redis_server.url, disk_enabled=False)
    keys = [key(f"cross-process {i}") for i in range(3)]
    writer.set_many([(k, vec(i)) for i, k in enumerate(keys)])
    # Another home and no disk: the only way to find the vectors is Redis. The resource
    # travels pickled, as it would to a worker process.
    reader = EmbeddingCacheResource(
        home=str(tmp_path / "elsewhere"), redis_url=redis_server.url, disk_enabled=False
    )
    result = run_python(READ_IN_CHILD.format(keys=keys, dim=DIM), stdin=pickle.dumps(reader))
    for i, got in enumerate(result["vectors"]):
        np.testing.assert_array_equal(np.array(got, dtype=np.float32), vec(i))
    assert result["stats"]["redis_hits"] == 3 and result["stats"]["redis_status"] == "ok"


def test_second_process_reads_vectors_through_disk(make_cache):
    writer = make_cache()
    keys = [key(f"on shared disk {i}") for i in range(3)]
    writer.set_many([(k, vec(i)) for i, k in enumerate(keys)])
    result = run_python(READ_IN_CHILD.format(keys=keys, dim=DIM), stdin=pickle.dumps(writer))
    for i, got in enumerate(result["vectors"]):
        np.testing.assert_array_equal(np.array(got, dtype=np.float32), vec(i))
    assert result["stats"]["disk_hits"] == 3


WRITE_IN_CHILD = """
import json, sys
import numpy as np
from resources.cache import EmbeddingCacheResource
cache = EmbeddingCacheResource(home={home!r}, lru_entries=0)
worker = {worker}
for batch in range(20):
    vector = np.full(4, worker, np.float32)
    cache.set_many([(f"emb:test:{{worker}}-{{batch}}-{{i}}", vector) for i in range(10)])
print(json.dumps(cache.stats()))
"""


def test_processes_write_the_disk_tier_concurrently(tmp_path, make_cache):
    home = str(tmp_path / "home")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITE_IN_CHILD.format(home=home, worker=w)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        for w in (1, 2, 3)
    ]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err.decode()
    reader = make_cache(home=home)
    keys = [f"emb:test:{w}-{b}-{i}" for w in (1, 2, 3) for b in range(20) for i in range(10)]
    got = reader.get_many(keys, 4)
    assert all(v is not None for v in got)
    assert {float(v[0]) for v in got} == {1.0, 2.0, 3.0}
    with sqlite3.connect(reader.disk_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --------------------------------------------------------------------------- Redis faults


def test_unreachable_redis_at_start_degrades_to_lru_and_disk(make_cache, caplog):
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    cache = make_cache(redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    k = key("no redis")
    started = time.monotonic()
    cache.set_many([(k, vec(1))])
    assert time.monotonic() - started < 1.0  # a refused connection is not retried in-call
    np.testing.assert_array_equal(cache.get_many([k], DIM)[0], vec(1))
    assert cache.get_many([key("absent")], DIM) == [None]
    cache.close()
    cache = make_cache(redis_url=cache.redis_url)  # fresh tiers: served from disk
    np.testing.assert_array_equal(cache.get_many([k], DIM)[0], vec(1))

    stats = cache.stats()
    assert stats["redis_status"] == "degraded" and stats["redis_errors"] == 1 and stats["disk_hits"] == 1
    assert len(cache_warnings(caplog)) == 2  # one per outage; close() dropped the first tiers
    assert "unavailable" in cache_warnings(caplog)[0].getMessage()


def test_redis_killed_mid_run_degrades_then_recovers(make_cache, redis_server, caplog):
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    cache = make_cache(redis_url=redis_server.url, redis_retry_seconds=0.3)
    raw = redis.Redis.from_url(redis_server.url)
    cache.set_many([(key("before"), vec(1))])
    assert raw.get(key("before")) is not None

    redis_server.stop()
    cache.set_many([(key("during"), vec(2))])
    assert cache.stats()["redis_status"] == "degraded"
    # Inside the retry window Redis is skipped: no new error, no new warning.
    assert cache.get_many([key("during"), key("absent")], DIM)[1] is None
    cache.set_many([(key("during 2"), vec(3))])
    assert cache.stats()["redis_errors"] == 1
    # After the window Redis is tried again; still down is the same outage: no new warning.
    time.sleep(0.4)
    cache.set_many([(key("during 3"), vec(3))])
    assert cache.stats()["redis_errors"] == 2
    assert len(cache_warnings(caplog)) == 1

    redis_server.start()
    time.sleep(0.4)
    cache.set_many([(key("after"), vec(4))])
    assert cache.stats()["redis_status"] == "ok"
    assert raw.get(key("after")) == encode_vector(vec(4), key("after"))
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == CACHE_LOGGER)

    redis_server.stop()  # a second outage is a second warning
    cache.set_many([(key("second outage"), vec(5))])
    assert len(cache_warnings(caplog)) == 2


@pytest.fixture
def silent_tcp_server():
    """A socket that accepts connections (kernel backlog) but never reads or answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


def test_every_redis_call_is_bounded_by_the_timeout(make_cache, silent_tcp_server, caplog):
    cache = make_cache(redis_url=f"redis://127.0.0.1:{silent_tcp_server}/0", redis_timeout_ms=200)
    started = time.monotonic()
    assert cache.get_many([key("slow")], DIM) == [None]
    assert time.monotonic() - started < 1.0
    assert cache.stats()["redis_status"] == "degraded"
    assert "Timeout" in cache_warnings(caplog)[0].getMessage()

    started = time.monotonic()
    cache.set_many([(key("slow"), vec(1))])  # skipped during the retry window
    np.testing.assert_array_equal(cache.get_many([key("slow")], DIM)[0], vec(1))
    assert time.monotonic() - started < 0.5


def test_redis_auth_works_and_wrong_password_degrades_without_leaking(
    make_cache, redis_server_auth, caplog, recwarn
):
    caplog.set_level(logging.DEBUG, logger=CACHE_LOGGER)
    good = make_cache(redis_url=redis_server_auth.url, disk_enabled=False)
    good.set_many([(key("authed"), vec(1))])
    good.close()
    np.testing.assert_array_equal(good.get_many([key("authed")], DIM)[0], vec(1))
    assert good.stats()["redis_hits"] == 1
    assert redis_server_auth.password not in good.masked_redis_url()

    wrong_password = "wrong-" + redis_server_auth.password[::-1]
    for url in (
        f"redis://:{wrong_password}@127.0.0.1:{redis_server_auth.port}/0",
        f"redis://127.0.0.1:{redis_server_auth.port}/0",  # no password at all
    ):
        bad = make_cache(redis_url=url)
        bad.set_many([(key("local only"), vec(2))])
        np.testing.assert_array_equal(bad.get_many([key("local only")], DIM)[0], vec(2))
        assert bad.get_many([key("authed")], DIM) == [None]
        assert bad.stats()["redis_status"] == "degraded"

    assert len(cache_warnings(caplog)) == 2
    logged = caplog.text + "".join(str(w.message) for w in recwarn)
    assert wrong_password not in logged and redis_server_auth.password not in logged
    assert ":***@" in cache_warnings(caplog)[0].getMessage()


# --------------------------------------------------------------------------- pickling and Dagster


def test_resource_pickles_after_use(make_cache, redis_server):
    cache = make_cache(redis_url=redis_server.url)
    cache.set_many([(key("pickled"), vec(3))])
    cache.get_many([key("pickled")], DIM)
    clone = pickle.loads(pickle.dumps(cache))
    assert clone == cache or clone.model_dump() == cache.model_dump()
    np.testing.assert_array_equal(clone.get_many([key("pickled")], DIM)[0], vec(3))


def test_dagster_run_uses_the_cache_and_survives_missing_redis(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)

    @dg.asset
    def cached_vectors(embedding_cache: EmbeddingCacheResource) -> dict:
        embedding_cache.set_many([(key("in dagster"), vec(1))])
        found = embedding_cache.get_many([key("in dagster"), key("missing")], DIM)
        return {"found": [v is not None for v in found], **embedding_cache.stats()}

    cache = EmbeddingCacheResource(
        home=str(tmp_path / "home"), redis_url=f"redis://:topsecret@127.0.0.1:{closed_port()}/0"
    )
    try:
        result = dg.materialize([cached_vectors], resources={"embedding_cache": cache})
        assert result.success
        output = result.output_for_node("cached_vectors")
        assert output["found"] == [True, False] and output["redis_status"] == "degraded"
        assert (output["writes"], output["lru_hits"], output["misses"]) == (1, 1, 1)
        assert len(cache_warnings(caplog)) == 1  # from the PING in setup_for_execution
        assert "topsecret" not in caplog.text
    finally:
        cache.close()


def test_dagster_run_fails_fast_on_an_invalid_env_bound_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_CACHE_BAD_URL", "memcached://:topsecret@127.0.0.1:11211")

    @dg.asset
    def needs_cache(embedding_cache: EmbeddingCacheResource) -> None:
        raise AssertionError("the step must not start with an invalid cache setting")

    cache = EmbeddingCacheResource(home=str(tmp_path / "home"), redis_url=dg.EnvVar("TEST_CACHE_BAD_URL"))
    with pytest.raises(Exception) as raised:
        dg.materialize([needs_cache], resources={"embedding_cache": cache})
    text = "".join(str(e) for e in (raised.value, raised.value.__cause__, raised.value.__context__) if e)
    assert "redis_url" in text and "memcached" in text and "topsecret" not in text
