"""Security: cache bytes are never unpickled or evaluated, Redis AUTH works from the environment
and its password never lands in logs, run records or errors, and vectors of two model settings
never mix.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sqlite3
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import redis

from embedding_assets.core.identity import embedding_cache_key
from embedding_assets.definitions import build_definitions
from embedding_assets.runner import materialize_source
from resources import EmbeddingCacheResource
from tests.pipeline_support import FIXTURE_CORPUS, make_pipeline

ROOT = Path(__file__).resolve().parents[1]
# Deserializers that can run code, and dynamic evaluation; `.eval()` (a torch method) is not matched.
UNSAFE = re.compile(
    r"\bpickle\.(loads?|Unpickler)\b|\b(cloudpickle|dill|marshal)\b|(?<![\w.])(eval|exec)\(|yaml\.load\(|yaml\.unsafe_load"
)


def test_no_unpickling_or_eval_in_the_code():
    offenders = []
    for folder in ("resources", "embedding_assets"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if UNSAFE.search(line.split("#", 1)[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


class _Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_redis_or_on_disk_is_a_miss_and_never_runs(tmp_path, redis_server):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    cache = EmbeddingCacheResource(home=str(tmp_path / "home"), redis_url=redis_server.url, lru_entries=0)
    redis_key, disk_key = embedding_cache_key("m", "1" * 64), embedding_cache_key("m", "2" * 64)
    cache.get_many(["warm-up"], 8)  # opens the disk tier
    redis.Redis.from_url(redis_server.url).set(redis_key, payload)
    with sqlite3.connect(cache.disk_path) as con:
        con.execute("INSERT INTO embeddings VALUES (?, ?)", [disk_key, payload])
    con.close()
    assert cache.get_many([redis_key, disk_key], 8) == [None, None]
    assert cache.stats()["corrupt"] == 2
    assert not marker.exists()


def _all_bytes_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_redis_auth_from_env_works_and_the_password_never_leaks(tmp_path, redis_server_auth, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    password = redis_server_auth.password
    sources = tmp_path / "sources"
    for source in ("alpha", "beta"):
        (sources / source).mkdir(parents=True)
        for file in (FIXTURE_CORPUS / source).iterdir():
            (sources / source / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("EMBEDDING_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMBEDDING_SOURCES_DIR", str(sources))
    monkeypatch.setenv("EMBEDDING_REDIS_URL", redis_server_auth.url)
    monkeypatch.setenv("EMBEDDING_REDIS_TIMEOUT_MS", "200")
    defs = build_definitions()  # resources from EMBEDDING_* (the Redis URL bound with dg.EnvVar)
    client = redis.Redis.from_url(redis_server_auth.url)
    with dg.instance_for_test() as instance:
        alpha = materialize_source(defs, instance, "alpha", quiet=False)
        assert alpha["embeddings"]["redis_status"] == "ok"
        assert client.dbsize() == alpha["embeddings"]["embedded_by_model"] > 0

        # Redis goes away mid-session: the warning names the server without its password.
        redis_server_auth.stop()
        beta = materialize_source(defs, instance, "beta", quiet=False)
        assert beta["embeddings"]["redis_status"] == "degraded"
        warnings = [r.getMessage() for r in caplog.records if "Redis" in r.getMessage()]
        assert any("***" in w for w in warnings), warnings

        # A wrong password: the authentication error is scrubbed too.
        redis_server_auth.start()
        wrong = redis_server_auth.url.replace(password, "wrong-" + password[::-1])
        bad = EmbeddingCacheResource(home=str(tmp_path / "other"), redis_url=wrong, redis_retry_seconds=60)
        bad.get_many([embedding_cache_key("m", "3" * 64)], 8)
        assert bad.stats()["redis_status"] == "degraded"

        runs = instance.get_runs()
        assert len(runs) == 2
        for run in runs:
            assert password not in repr(run.run_config)
            for entry in instance.all_logs(run.run_id):
                assert password not in repr(entry)
        stored = _all_bytes_under(Path(instance.root_directory))
        assert stored and password.encode() not in stored  # event log DBs, compute logs, run storage
    assert password.encode() not in _all_bytes_under(tmp_path / "home")
    out, err = capfd.readouterr()
    assert password not in out + err
    assert password[::-1] not in out + err
    assert password not in caplog.text and password[::-1] not in caplog.text


@pytest.mark.slow
def test_two_max_seq_lengths_never_read_each_others_vectors(tmp_path):
    """Same home, same cache, same chunk texts; only max_seq_length differs -> separate vectors."""
    with dg.instance_for_test() as instance:
        default = make_pipeline(tmp_path, instance, copy_corpus=False)
        notes = default.sources_root / "notes"
        notes.mkdir()
        for i, topic in enumerate(("harbour seals", "alpine meadows", "clock repair", "kelp forests", "salt marshes")):
            (notes / f"{i}.txt").write_text(f"A short note on {topic}: seen on day {i}, weather fair, {i + 3} people.\n")
        first = default.run_source("notes")["embeddings"]
        n = first["row_count"]
        assert n == 5 and first["embedded_by_model"] == 5

        short = make_pipeline(tmp_path, instance, copy_corpus=False, max_seq_length=128)
        second = short.run_source("notes")["embeddings"]
        assert second["model_fingerprint"] != first["model_fingerprint"]
        assert second["embedded_by_model"] == n == second["row_count"]
        assert second["cache_hit_rate"] == 0.0
        fingerprints = short.rows("SELECT DISTINCT model_fingerprint FROM embeddings")
        assert fingerprints == [(second["model_fingerprint"],)]
        # Both settings' vectors now sit side by side in the cache, under separate keys.
        with sqlite3.connect(short.resources["cache"].disk_path) as con:
            keys = [k for (k,) in con.execute("SELECT key FROM embeddings")]
        con.close()
        assert sorted({k.split(":")[1] for k in keys}) == sorted([first["model_fingerprint"], second["model_fingerprint"]])
        assert len(keys) == 2 * n

        # And back to the default: all cache hits of its own vectors, none of the other's.
        again = make_pipeline(tmp_path, instance, copy_corpus=False).run_source("notes")["embeddings"]
        assert again["model_fingerprint"] == first["model_fingerprint"]
        assert again["embedded_by_model"] == 0 and again["row_count"] == n
