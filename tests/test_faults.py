"""Faults injected for real: a redis-server killed and restarted, a silent socket, corrupt cache
bytes, a CLI process killed with SIGKILL mid-run, a full and a read-only file system (tmpfs).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
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

from embedding_assets.core.identity import embedding_cache_key
from tests.disk_support import fill, mounted_tmpfs
from tests.pipeline_support import index_count
from embedding_assets.progress import set_terminal_reporter
from embedding_assets.runner import RunFailed
from resources import EmbeddingCacheResource, IndexStoreResource, WarehouseResource
from resources.cache import decode_vector, encode_vector
from tests.pipeline_support import FIXTURE_CORPUS, make_pipeline

# Runs the asset graph with the real model (in process or through the CLI): `make test-fast` skips it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = ROOT / "data" / "sources" / "sample"


def _embedding_metadata(report: dict) -> dict:
    return report["embeddings"]


# --------------------------------------------------------------------------- Redis faults


def test_redis_down_at_start_then_killed_mid_run_then_back(tmp_path, redis_server, caplog):
    """Down at start -> degraded; back -> used; killed between steps of one run -> that run completes."""
    caplog.set_level(logging.WARNING, logger="embedding_pipeline.cache")
    client = redis.Redis.from_url(redis_server.url)
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance, redis_url=redis_server.url)
        (pipeline.sources_root / "gamma").mkdir()
        (pipeline.sources_root / "gamma" / "glaciers.md").write_text(
            "# Glaciers\n\nIce cores drilled from glaciers record centuries of air bubbles, dust and volcanic ash.\n"
        )

        redis_server.stop()
        alpha = pipeline.run_source("alpha")
        assert _embedding_metadata(alpha)["redis_status"] == "degraded"
        assert _embedding_metadata(alpha)["embedded_by_model"] == alpha["embeddings"]["row_count"] > 0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Redis" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one warning per outage, not per call

        redis_server.start()
        time.sleep(0.6)  # redis_retry_seconds=0.5 in make_pipeline
        beta = pipeline.run_source("beta")
        assert _embedding_metadata(beta)["redis_status"] == "ok"
        assert client.dbsize() == _embedding_metadata(beta)["embedded_by_model"] > 0

        # Kill Redis in the middle of a run: after raw_documents has run (Redis was pinged OK
        # at resource setup), before the embeddings step reads and writes the cache.
        def kill_when_chunking(stage, done, total, unit):
            if stage == "chunks":
                redis_server.stop()

        set_terminal_reporter(kill_when_chunking)
        try:
            gamma = pipeline.run_source("gamma")
        finally:
            set_terminal_reporter(None)
        assert _embedding_metadata(gamma)["redis_status"] == "degraded"
        assert gamma["embeddings"]["row_count"] > 0

        redis_server.start()
        time.sleep(0.6)
        key = embedding_cache_key("probe", "0" * 64)
        pipeline.resources["cache"].set_many([(key, np.ones(384, dtype=np.float32))])
        assert pipeline.resources["cache"].stats()["redis_status"] == "ok"
        assert decode_vector(client.get(key), 384, key) is not None
    live = pipeline.rows("SELECT count(*) FROM embeddings")[0][0]
    canonical = pipeline.rows(
        "SELECT count(*) FROM chunk_dedup x JOIN chunks USING (chunk_id) WHERE x.status = 'canonical'"
    )[0][0]
    assert live == canonical


def test_redis_that_never_answers_is_bounded_by_the_timeout(tmp_path):
    """A socket that accepts connections but never replies (a hung Redis) costs one timeout, then degrades."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        cache = EmbeddingCacheResource(
            home=str(tmp_path), redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_ms=150, redis_retry_seconds=60
        )
        keys = [embedding_cache_key("m", f"{i:064x}") for i in range(50)]
        started = time.monotonic()
        assert cache.get_many(keys, 8) == [None] * 50
        first = time.monotonic() - started
        cache.set_many([(k, np.ones(8, dtype=np.float32)) for k in keys])
        assert all(v is not None for v in cache.get_many(keys, 8))
        total = time.monotonic() - started
    assert first < 1.0, first
    assert total < 1.5, total  # degraded: later calls skip Redis instead of waiting again
    assert cache.stats()["redis_status"] == "degraded"


# --------------------------------------------------------------------------- corrupt cache entries

BAD_VALUES = {
    "truncated": lambda good: good[: len(good) // 2],
    "header only": lambda good: good[:12],
    "wrong magic": lambda good: b"XXXX" + good[4:],
    "wrong dtype": lambda good: good[:4] + b"\x02" + good[5:],
    "wrong dim": lambda good: encode_vector(np.ones(100, dtype=np.float32), "any key"),
    "trailing bytes": lambda good: good + b"\x00\x00\x00\x00",
    "empty": lambda good: b"",
    "pickle": lambda good: b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.",
}


def test_corrupt_entries_in_redis_and_disk_are_misses_and_get_overwritten(tmp_path, redis_server):
    cache = EmbeddingCacheResource(home=str(tmp_path), redis_url=redis_server.url, lru_entries=0)
    good = {name: np.full(16, i + 1, dtype=np.float32) for i, name in enumerate(BAD_VALUES)}
    keys = {name: embedding_cache_key("model-c", f"{i:064x}") for i, name in enumerate(BAD_VALUES)}
    client = redis.Redis.from_url(redis_server.url)
    cache.get_many(["warm-up"], 16)  # opens the tiers: creates the disk file and its table
    disk = sqlite3.connect(cache.disk_path)
    for name, corrupt in BAD_VALUES.items():
        bad = corrupt(encode_vector(good[name], keys[name]))
        client.set(keys[name], bad)
        disk.execute("INSERT OR REPLACE INTO embeddings VALUES (?, ?)", [keys[name], bad])
    disk.commit()
    order = list(BAD_VALUES)
    assert cache.get_many([keys[n] for n in order], 16) == [None] * len(order)
    assert cache.stats()["corrupt"] == 2 * len(order)  # each key: once in Redis, once on disk
    cache.set_many([(keys[n], good[n]) for n in order])
    for name in order:
        assert client.get(keys[name]) == encode_vector(good[name], keys[name])
        stored = disk.execute("SELECT value FROM embeddings WHERE key = ?", [keys[name]]).fetchone()[0]
        assert stored == encode_vector(good[name], keys[name])
    again = cache.get_many([keys[n] for n in order], 16)
    assert all(np.array_equal(v, good[n]) for v, n in zip(again, order))
    disk.close()


def test_pipeline_ignores_a_corrupted_disk_cache_and_rewrites_it(tmp_path):
    """Every stored value truncated: the run embeds everything with the model and repairs the file."""
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance)
        n = pipeline.run_source("beta")["embeddings"]["row_count"]
        cache = pipeline.resources["cache"]
        cache.close()  # drops this process's LRU and SQLite handle for these settings
        con = sqlite3.connect(cache.disk_path)
        assert con.execute("UPDATE embeddings SET value = substr(value, 1, 40)").rowcount == n
        con.commit()
        con.close()
        with pipeline.warehouse.connect() as wh:
            wh.execute("DELETE FROM embeddings WHERE source = 'beta'")
        again = pipeline.run_source("beta")["embeddings"]
        assert again["cache_hits_disk"] == 0 and again["embedded_by_model"] == n == again["row_count"]
        cache.close()
        con = sqlite3.connect(cache.disk_path)
        values = con.execute("SELECT key, value FROM embeddings").fetchall()
        con.close()
        assert len(values) == n and all(decode_vector(v, 384, k) is not None for k, v in values)


# --------------------------------------------------------------------------- a killed run

def _cli_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env.update(
        EMBEDDING_HOME=str(tmp / "home"), EMBEDDING_SOURCES_DIR=str(tmp / "sources"),
        DAGSTER_HOME=str(tmp / "dagster"), PYTHONUNBUFFERED="1",
    )
    return env


def _cli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def _bulk_corpus(folder: Path, documents: int) -> None:
    """Short distinct documents: one chunk each, no two near-duplicates (random word order)."""
    words = sorted(set(re.findall(r"[a-z]{4,}", " ".join(p.read_text().lower() for p in FIXTURE_CORPUS.rglob("*.md")))))
    rng = random.Random(7)
    folder.mkdir(parents=True)
    for i in range(documents):
        (folder / f"note-{i:04d}.txt").write_text(f"Note {i}. " + " ".join(rng.choice(words) for _ in range(14)) + ".\n")


def _assert_consistent(warehouse: WarehouseResource) -> int:
    for table in ("chunks", "chunk_dedup", "embeddings", "quantized_embeddings"):
        total, distinct = warehouse.query_rows(f"SELECT count(*), count(DISTINCT chunk_id) FROM {table}")[0]
        assert total == distinct, f"duplicate rows in {table}: {total} rows, {distinct} chunk ids"
    missing = warehouse.query_rows(
        """SELECT count(*) FROM chunk_dedup x JOIN chunks USING (chunk_id) WHERE x.status = 'canonical'
           AND chunk_id NOT IN (SELECT chunk_id FROM embeddings)"""
    )[0][0]
    assert missing == 0, f"{missing} canonical chunks lost their vector"
    orphans = warehouse.query_rows("SELECT count(*) FROM embeddings WHERE chunk_id NOT IN (SELECT chunk_id FROM chunks)")[0][0]
    assert orphans == 0
    return warehouse.query_rows("SELECT count(*) FROM embeddings")[0][0]


def test_sigkill_mid_embeddings_and_mid_index_keeps_the_published_index_and_loses_nothing(tmp_path):
    env = _cli_env(tmp_path)
    shutil.copytree(SAMPLE_CORPUS, tmp_path / "sources" / "sample")
    first = _cli(["materialize", "--json"], env)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    store = IndexStoreResource(home=env["EMBEDDING_HOME"])
    warehouse = WarehouseResource(home=env["EMBEDDING_HOME"])
    published = store.current()
    assert published is not None
    published_count = index_count(published)

    # More than one embeddings batch (512 chunks), so rows land before the step ends.
    _bulk_corpus(tmp_path / "sources" / "bulk", 900)
    run = _cli(["materialize", "--source", "bulk"], env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None:
        if warehouse.query_rows("SELECT count(*) FROM embeddings WHERE source = 'bulk'")[0][0] > 0:
            break
        time.sleep(0.05)
    assert run.poll() is None, "the run finished before it could be killed: " + run.communicate()[1][-2000:]
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    embedded_when_killed = warehouse.query_rows("SELECT count(*) FROM embeddings WHERE source = 'bulk'")[0][0]
    pending_when_killed = warehouse.query_rows(
        """SELECT count(*) FROM chunk_dedup x JOIN chunks k USING (chunk_id)
           WHERE k.source = 'bulk' AND x.status = 'canonical'"""
    )[0][0]
    assert 0 < embedded_when_killed < pending_when_killed  # really killed in the middle
    assert store.current().version == published.version
    assert index_count(store.current()) == published_count
    rows, distinct = warehouse.query_rows("SELECT count(*), count(DISTINCT chunk_id) FROM embeddings")[0]
    assert rows == distinct

    # Kill again while the index is being built: the published version stays whole.
    run = _cli(["materialize"], env)
    for line in run.stdout:
        if line.strip() == "index":
            break
    time.sleep(0.3)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    current = store.current()
    assert index_count(current) == current.manifest.get("count", index_count(current))

    final = _cli(["materialize", "--json"], env)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err[-3000:]
    vectors = _assert_consistent(warehouse)
    assert vectors > published_count + 800
    assert index_count(store.current()) == vectors
    assert store.current().version != published.version


# --------------------------------------------------------------------------- full / read-only disk


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 MiB tmpfs (see tests/disk_support.py)."""
    with mounted_tmpfs(tmp_path / "mnt", "256m") as mount_point:
        yield mount_point


def _index_listing(store: IndexStoreResource) -> set[str]:
    return {p.relative_to(store.root).as_posix() for p in store.root.rglob("*")}


def test_disk_full_and_read_only_home_fail_clearly_and_publish_nothing_half(tmp_path, tiny_tmpfs):
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance)
        home = tiny_tmpfs / "home"
        pipeline.resources.update(
            warehouse=WarehouseResource(home=str(home)), index_store=IndexStoreResource(home=str(home)),
            cache=EmbeddingCacheResource(home=str(home)),
        )
        from embedding_assets.definitions import build_definitions

        pipeline.defs = build_definitions(pipeline.resources)
        store = pipeline.resources["index_store"]
        pipeline.run_source("alpha")
        first = pipeline.run_index()
        published = store.current()
        before = _index_listing(store)
        pipeline.run_source("beta")  # new vectors the next index would include

        ballast = fill(tiny_tmpfs)
        with pytest.raises(RunFailed) as caught:
            pipeline.run_index()
        message = str(caught.value)
        assert "No space left on device" in message or "full" in message.lower(), message
        assert store.current().version == published.version
        assert index_count(store.current()) == first["row_count"]
        assert _index_listing(store) == before  # no scratch or half-written version left behind

        ballast.unlink()
        second = pipeline.run_index()
        assert second["row_count"] > first["row_count"]
        published = store.current()
        before = _index_listing(store)

        pipeline.resources["cache"].close()  # a file open for writing makes `remount,ro` fail (EBUSY)
        subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
        try:
            (pipeline.sources_root / "beta" / "new-note.md").write_text("# Fresh\n\nA fresh note about glaciers and ice cores.\n")
            with pytest.raises(RunFailed) as caught:
                pipeline.run_source("beta")
            message = str(caught.value)
            assert "Read-only file system" in message and str(home) in message, message
            # Nothing new reached the warehouse, so the index has nothing to publish: it reads the
            # read-only home (shared lock on a read-only file) and keeps the published version.
            assert pipeline.run_index()["build_mode"] == "unchanged"
            assert store.current().version == published.version
            assert index_count(store.current()) == second["row_count"]
            assert _index_listing(store) == before
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(tiny_tmpfs)], check=False)
