"""The shared cache tier is a trust boundary: crafted values in a real redis-server, real damaged files.

Values are forged here from the documented format (``resources/cache/codec.py``), not through the
cache's own encoder, so the tests also pin the format down: anyone who can write to Redis can
produce a correctly checksummed value, which is why values are also validated, bound to their key,
optionally HMAC'd, and audited by the embeddings stage (``tests/test_cache_trust_pipeline.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sqlite3
import struct

import dagster as dg
import numpy as np
import pytest
import redis

from embedding_assets.core.identity import embedding_cache_key, fingerprint, text_sha256
from embedding_assets.core.vector_checks import audit_sample_size, invalid_rows, mismatched
from resources.cache import (
    EmbeddingCacheConfigError,
    EmbeddingCacheResource,
    EmbeddingCacheStorageError,
    EmbeddingCacheValueError,
    Verdict,
    check_value,
    encode_vector,
)

DIM = 16
MODEL = fingerprint("model", {"name": "trust-test", "dim": DIM})
SECRET = "s3cret-" + "x" * 25
OTHER_SECRET = "other-" + "y" * 26
CACHE_LOGGER = "embedding_pipeline.cache"


def key(text: str) -> str:
    return embedding_cache_key(MODEL, text_sha256(text))


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def forge(k: str, payload: np.ndarray, *, secret: str | None = None, tag_kind: int | None = None) -> bytes:
    """A value written by someone else, straight from the documented format: any float32 payload."""
    payload = np.asarray(payload, dtype="<f4")
    kind = tag_kind or (2 if secret else 1)
    header = struct.pack("<4sBB2xI", b"EMB2", 1, kind, payload.shape[0])
    body = payload.tobytes()
    encoded = k.encode()
    message = struct.pack("<I", len(encoded)) + encoded + header + body
    if kind == 2:
        tag = hmac.new((secret or "").encode(), message, hashlib.sha256).digest()
    else:
        tag = hashlib.blake2b(message, digest_size=16, person=b"emb-cache-v2").digest()
    return header + body + tag


@pytest.fixture
def make_cache(tmp_path):
    made: list[EmbeddingCacheResource] = []

    def make(**settings) -> EmbeddingCacheResource:
        settings.setdefault("home", str(tmp_path / "home"))
        cache = EmbeddingCacheResource(**settings)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CACHE_LOGGER and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------- crafted values in a real Redis

TEXT = "the chunk whose key is attacked"
CRAFTED = {
    # name: (value builder given the key, the verdict the reader must reach)
    "nan": (lambda k: forge(k, np.full(DIM, np.nan)), Verdict.INVALID),
    "one nan": (lambda k: forge(k, np.where(np.arange(DIM) == 3, np.nan, unit(1))), Verdict.INVALID),
    "inf": (lambda k: forge(k, np.where(np.arange(DIM) == 0, np.inf, 0.0)), Verdict.INVALID),
    "norm 2": (lambda k: forge(k, 2 * unit(2)), Verdict.INVALID),
    "norm 0.9": (lambda k: forge(k, 0.9 * unit(2)), Verdict.INVALID),
    "zero vector": (lambda k: forge(k, np.zeros(DIM)), Verdict.INVALID),
    "huge finite values": (lambda k: forge(k, np.full(DIM, 3e38)), Verdict.INVALID),
    "wrong dim, valid tag": (lambda k: forge(k, unit(3, DIM + 1)), Verdict.MALFORMED),
    "copied from another key": (lambda k: forge(key("other text"), unit(4)), Verdict.UNTRUSTED),
    "another model's key": (
        lambda k: forge(embedding_cache_key(fingerprint("model", {"name": "other"}), text_sha256(TEXT)), unit(4)),
        Verdict.UNTRUSTED,
    ),
    "payload edited after tagging": (lambda k: forge(k, unit(5))[:12] + unit(6).tobytes() + forge(k, unit(5))[-16:], Verdict.UNTRUSTED),
    "hmac tag without a secret set": (lambda k: forge(k, unit(7), secret=SECRET), Verdict.UNTRUSTED),
    "truncated": (lambda k: forge(k, unit(8))[:-5], Verdict.MALFORMED),
    "truncated to the header": (lambda k: forge(k, unit(8))[:12], Verdict.MALFORMED),
    "first format (no tag)": (lambda k: b"EMB1\x01\0\0\0" + struct.pack("<I", DIM) + unit(9).tobytes(), Verdict.MALFORMED),
    "empty": (lambda k: b"", Verdict.MALFORMED),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_redis_value_is_a_counted_miss_and_is_overwritten(make_cache, redis_server, name):
    build, verdict = CRAFTED[name]
    k = key(TEXT)
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(k, build(k))
    cache = make_cache(redis_url=redis_server.url, disk_enabled=False)

    assert cache.get_many([k], DIM, unit_norm=True) == [None]
    stats = cache.stats()
    assert (stats["corrupt"], stats[verdict.value], stats["misses"], stats["redis_hits"]) == (1, 1, 1, 0)
    assert stats["lru_size"] == 0  # nothing rejected was kept anywhere

    cache.set_many([(k, unit(10))])
    assert raw.get(k) == encode_vector(unit(10), k)
    cache.close()  # forget the LRU: read Redis again
    np.testing.assert_array_equal(cache.get_many([k], DIM, unit_norm=True)[0], unit(10))


@pytest.mark.parametrize(
    ("writer_secret", "reader_secret"),
    [(None, SECRET), (OTHER_SECRET, SECRET), (SECRET, None)],
    ids=["checksum-only-value, reader-has-secret", "hmac-of-another-secret", "hmac-value, reader-without-secret"],
)
def test_values_without_a_valid_hmac_for_the_readers_secret_are_misses(make_cache, redis_server, writer_secret, reader_secret):
    keys = [key(f"hmac {i}") for i in range(5)]
    writer = make_cache(redis_url=redis_server.url, disk_enabled=False, lru_entries=0, secret=writer_secret)
    writer.set_many([(k, unit(i)) for i, k in enumerate(keys)])
    reader = make_cache(home=writer.home + "-reader", redis_url=redis_server.url, lru_entries=0, secret=reader_secret)
    assert reader.get_many(keys, DIM, unit_norm=True) == [None] * 5
    assert reader.stats()["untrusted"] == 5
    # The reader embeds them itself and writes back: now every reader with its secret is served.
    reader.set_many([(k, unit(i)) for i, k in enumerate(keys)])
    again = make_cache(home=writer.home + "-third", redis_url=redis_server.url, lru_entries=0, secret=reader_secret)
    assert all(np.array_equal(v, unit(i)) for i, v in enumerate(again.get_many(keys, DIM, unit_norm=True)))


def test_a_forged_well_formed_vector_passes_a_checksum_but_not_an_hmac(make_cache, redis_server):
    """Without a secret anyone can write a valid-looking vector of other text (the audit's job);
    with a secret the same forgery is a miss."""
    k = key(TEXT)
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(k, forge(k, unit(42)))  # unit norm, correct checksum for this key: well-formed but wrong
    open_cache = make_cache(redis_url=redis_server.url, disk_enabled=False)
    (hit,) = open_cache.lookup([k], DIM, unit_norm=True)
    assert hit is not None and hit.tier == "redis" and hit.shared  # served, and marked for the audit
    np.testing.assert_array_equal(hit.vector, unit(42))

    guarded = make_cache(redis_url=redis_server.url, disk_enabled=False, secret=SECRET)
    assert guarded.get_many([k], DIM, unit_norm=True) == [None]
    assert guarded.stats()["untrusted"] == 1
    raw.set(k, forge(k, unit(42), secret=SECRET))  # only a holder of the secret can do this
    assert guarded.get_many([k], DIM, unit_norm=True)[0] is not None


def test_bad_redis_value_falls_through_to_the_local_disk_value(make_cache, redis_server):
    k = key("good on disk")
    local = make_cache()  # disk only: writes the good value locally
    local.set_many([(k, unit(11))])
    raw = redis.Redis.from_url(redis_server.url)
    raw.set(k, forge(k, np.full(DIM, np.nan)))
    both = make_cache(redis_url=redis_server.url, lru_entries=0)
    (hit,) = both.lookup([k], DIM, unit_norm=True)
    assert hit.tier == "disk" and not hit.shared
    np.testing.assert_array_equal(hit.vector, unit(11))
    assert both.stats()["invalid"] == 1
    assert raw.get(k) == encode_vector(unit(11), k)  # the disk hit back-filled (repaired) Redis


def test_unit_norm_is_checked_only_when_asked_and_also_on_lru_hits(make_cache):
    cache = make_cache(disk_enabled=False)
    k = key("not normalized")
    cache.set_many([(k, 3 * unit(12))])  # a caller that does not normalize may cache this
    np.testing.assert_array_equal(cache.get_many([k], DIM)[0], 3 * unit(12))
    assert cache.get_many([k], DIM, unit_norm=True) == [None]


def test_distrust_drops_what_redis_put_in_the_lru_and_stops_reading_it(make_cache, redis_server, caplog):
    caplog.set_level(logging.INFO, logger=CACHE_LOGGER)
    shared_keys = [key(f"from redis {i}") for i in range(3)]
    raw = redis.Redis.from_url(redis_server.url)
    for i, k in enumerate(shared_keys):
        raw.set(k, forge(k, unit(20 + i)))
    cache = make_cache(redis_url=redis_server.url, disk_enabled=False)
    local_key = key("computed here")
    cache.set_many([(local_key, unit(30))])
    assert all(h.tier == "redis" for h in cache.lookup(shared_keys, DIM, unit_norm=True))
    assert all(h.tier == "lru" and h.origin == "redis" for h in cache.lookup(shared_keys, DIM, unit_norm=True))

    cache.distrust("redis", "test")
    cache.distrust("redis", "test again")
    assert cache.stats()["redis_status"] == "distrusted"
    assert cache.lookup(shared_keys, DIM, unit_norm=True) == [None] * 3  # neither LRU nor Redis
    (local,) = cache.lookup([local_key], DIM, unit_norm=True)
    assert local.tier == "lru" and local.origin == "local"
    assert len([m for m in warnings_of(caplog) if "wrong vector" in m]) == 1
    # Writes still reach Redis: re-embedded vectors overwrite the bad ones there.
    cache.set_many([(shared_keys[0], unit(40))])
    assert raw.get(shared_keys[0]) == encode_vector(unit(40), shared_keys[0])
    # Another resource object (another run) trusts Redis again and audits it afresh.
    fresh = make_cache(redis_url=redis_server.url, disk_enabled=False)
    assert fresh.stats()["redis_status"] == "ok"
    with pytest.raises(EmbeddingCacheValueError, match="disk"):
        cache.distrust("disk", "the disk is local")


# --------------------------------------------------------------------------- the secret setting


def test_short_secret_fails_fast_without_echoing_it(tmp_path):
    with pytest.raises(EmbeddingCacheConfigError, match="EMBEDDING_CACHE_SECRET") as caught:
        EmbeddingCacheResource(home=str(tmp_path), secret="hunter2")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(EmbeddingCacheConfigError, match="EMBEDDING_CACHE_AUDIT_RATE"):
        EmbeddingCacheResource(home=str(tmp_path), audit_rate=1.5)


def test_env_bound_secret_is_resolved_at_first_use(tmp_path, monkeypatch, redis_server):
    monkeypatch.setenv("TEST_CACHE_SECRET", "short")
    cache = EmbeddingCacheResource(home=str(tmp_path), redis_url=redis_server.url, secret=dg.EnvVar("TEST_CACHE_SECRET"))
    with pytest.raises(EmbeddingCacheConfigError, match="at least 16") as caught:
        cache.get_many([key("x")], DIM)
    assert "short" not in str(caught.value).split("characters")[0]
    monkeypatch.delenv("TEST_CACHE_SECRET")
    with pytest.raises(EmbeddingCacheConfigError, match="TEST_CACHE_SECRET.*not set"):
        cache.get_many([key("x")], DIM)
    monkeypatch.setenv("TEST_CACHE_SECRET", SECRET)
    cache.set_many([(key("x"), unit(1))])
    value = redis.Redis.from_url(redis_server.url).get(key("x"))
    assert value == encode_vector(unit(1), key("x"), secret=SECRET.encode()) and len(value) == 12 + 4 * DIM + 32
    cache.close()


# --------------------------------------------------------------------------- pure checks


def test_vector_checks():
    good = np.stack([unit(i) for i in range(4)])
    assert not invalid_rows(good, DIM).any()
    bad = good.copy()
    bad[1, 0] = np.nan
    bad[2] *= 1.01  # v.v = 1.0201
    bad[3] *= 0.9996  # v.v = 0.9992: inside the tolerance
    assert invalid_rows(bad, DIM).tolist() == [False, True, True, False]
    assert invalid_rows(bad, DIM, unit_norm=False).tolist() == [False, True, False, False]
    assert invalid_rows(good, DIM + 1).all()
    assert [audit_sample_size(n, 0.01) for n in (0, 1, 99, 100, 101, 512)] == [0, 1, 1, 1, 2, 6]
    assert audit_sample_size(512, 0) == 0 and audit_sample_size(3, 1.0) == 3
    assert mismatched(good, good + 1e-4).tolist() == [False] * 4
    assert mismatched(good, good[::-1]).tolist() == [True] * 4
    assert mismatched(np.full((1, DIM), np.nan), good[:1]).tolist() == [True]


# --------------------------------------------------------------------------- damaged disk-cache files


def _fill(cache: EmbeddingCacheResource, n: int) -> list[str]:
    keys = [key(f"disk {i}") for i in range(n)]
    cache.set_many([(k, unit(i)) for i, k in enumerate(keys)])
    return keys


def _flip_inside_stored_values(data: bytes) -> bytes:
    """Flip one payload byte inside each of the first 10 stored values: the file stays a valid database."""
    out = bytearray(data)
    for i in range(10):
        at = data.find(encode_vector(unit(i), key(f"disk {i}")))
        assert at > 0
        out[at + 20] ^= 0x40
    return bytes(out)


DAMAGE = {
    # name: (damage, whether SQLite itself notices it)
    "garbage bytes": (lambda data: os.urandom(len(data)), True),
    "text file": (lambda data: b"this is not a database\n" * 100, True),
    "truncated mid-page": (lambda data: data[: len(data) // 3 + 100], True),
    "sqlite header then garbage": (lambda data: data[:16] + os.urandom(len(data) - 16), True),
    "header page zeroed": (lambda data: b"\0" * 4096 + data[4096:], True),
    "b-tree pages overwritten": (lambda data: data[:4096] + os.urandom(len(data) - 4096), True),
    "bytes flipped inside values": (_flip_inside_stored_values, False),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_disk_cache_file_is_moved_aside_and_recreated(make_cache, caplog, damage):
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    cache = make_cache(lru_entries=0)
    keys = _fill(cache, 300)
    cache.close()  # checkpoints the WAL into the main file
    path = cache.disk_path
    data = path.read_bytes()
    assert len(data) > 3 * 4096
    damage_fn, sqlite_notices = DAMAGE[damage]
    damaged = damage_fn(data)
    path.write_bytes(damaged)

    cache = make_cache(lru_entries=0)
    got = cache.get_many(keys, DIM, unit_norm=True)  # never raises: damage is a miss
    moved = [p for p in path.parent.glob("embeddings.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    if sqlite_notices:  # moved aside once, kept as it was for a post-mortem, one warning, empty file in its place
        assert len(moved) == 1 and moved[0].read_bytes() == damaged
        assert cache.stats()["disk_moved_aside"] == [str(moved[0])]
        assert len([m for m in warnings_of(caplog) if "damaged" in m and str(moved[0]) in m]) == 1
        assert got == [None] * len(keys)
    else:  # the file is a sound database: the flipped values fail their checksum, the rest is served
        assert moved == [] and cache.stats()["untrusted"] == 10
        assert got[:10] == [None] * 10
        assert all(np.array_equal(v, unit(i)) for i, v in enumerate(got) if i >= 10)
    # Whatever happened, the tier works again and holds good values.
    cache.set_many([(k, unit(i)) for i, k in enumerate(keys)])
    cache.close()
    again = make_cache(lru_entries=0)
    assert all(np.array_equal(v, unit(i)) for i, v in enumerate(again.get_many(keys, DIM, unit_norm=True)))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_garbage_file_before_first_use_is_moved_aside(make_cache, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    path = tmp_path / "home" / "cache" / "embeddings.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(10_000))
    wal = path.parent / "embeddings.sqlite-wal"
    garbage_wal = os.urandom(5_000)
    wal.write_bytes(garbage_wal)  # a stale companion must never be replayed into the new file
    cache = make_cache()
    cache.set_many([(key("a"), unit(1))])  # the write that found the damage is done on the new file
    moved = [p for p in path.parent.glob("embeddings.sqlite.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 1
    assert not wal.exists() or wal.read_bytes()[:100] != garbage_wal[:100]
    cache.close()
    np.testing.assert_array_equal(make_cache().get_many([key("a")], DIM)[0], unit(1))
    assert len(warnings_of(caplog)) == 1


def test_file_damaged_while_open_is_moved_aside_by_the_reader(make_cache, caplog):
    """Another actor overwrites the file under an open connection: the next read finds it."""
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    cache = make_cache(lru_entries=0)
    keys = _fill(cache, 300)
    cache.close()
    cache = make_cache(lru_entries=0)
    assert cache.get_many(keys[:1], DIM)[0] is not None  # connection open
    path = cache.disk_path
    with open(path, "r+b") as f:  # same inode, pages overwritten in place
        f.seek(4096)
        f.write(os.urandom(path.stat().st_size - 4096))
    got = cache.get_many(keys, DIM)
    assert cache.stats()["disk_moved_aside"], "the damage was not detected"
    assert sum(v is not None for v in got) <= 1
    cache.set_many([(keys[0], unit(0))])
    np.testing.assert_array_equal(cache.get_many(keys[:1], DIM)[0], unit(0))


def test_a_folder_in_place_of_the_file_is_an_error_not_damage(make_cache, tmp_path):
    path = tmp_path / "home" / "cache" / "embeddings.sqlite"
    path.mkdir(parents=True)
    cache = make_cache()
    with pytest.raises(EmbeddingCacheStorageError, match="embeddings.sqlite"):
        cache.get_many([key("a")], DIM)
    assert path.is_dir() and not list(path.parent.glob("*.corrupt-*"))


def test_check_value_never_raises_on_random_bytes():
    rng = np.random.default_rng(0)
    k = key("fuzz")
    good = encode_vector(unit(1), k)
    for n in range(2000):
        size = int(rng.integers(0, len(good) + 40))
        blob = bytearray(good[:size] if n % 2 else rng.bytes(size))
        if blob and n % 3 == 0:
            blob[int(rng.integers(0, len(blob)))] ^= 1 << int(rng.integers(0, 8))
        vector, verdict = check_value(bytes(blob), DIM, k, unit_norm=True)
        assert (vector is None) == (verdict is not Verdict.OK)
        if vector is not None:
            np.testing.assert_array_equal(vector, unit(1))
