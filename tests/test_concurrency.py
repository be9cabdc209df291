"""Concurrency with real processes: two CLI runs on one EMBEDDING_HOME at the same time.

Both must succeed (or one fail cleanly); afterwards there are no duplicate rows, every canonical
chunk has exactly one vector, and the published index holds exactly those vectors.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline_support import index_count
from resources import IndexStoreResource, WarehouseResource
from resources.locks import LockTimeout, file_lock
from tests.pipeline_support import FIXTURE_CORPUS

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp: Path, sources: Path, warehouse_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env.update(
        EMBEDDING_HOME=str(tmp / "home"), EMBEDDING_SOURCES_DIR=str(sources),
        DAGSTER_HOME=str(tmp / "dagster"), PYTHONUNBUFFERED="1",
    )
    if warehouse_url:
        env["EMBEDDING_WAREHOUSE_URL"] = warehouse_url
    return env


def _init_instance(env: dict[str, str]) -> None:
    """Create the Dagster instance storage first: Dagster's own SQLite schema creation is not safe
    against two processes creating a brand-new DAGSTER_HOME at the same instant."""
    code = "from embedding_assets.cli import _instance; _instance().get_runs()"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "materialize", "--json", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=300)
    report = json.loads(out) if proc.returncode == 0 else None
    return proc.returncode, report, err


def _check_consistent(home: str, url: str | None = None) -> int:
    warehouse = WarehouseResource(home=home, url=url)
    for table in ("documents", "cleaned_documents", "chunked_documents"):
        total, distinct = warehouse.query_rows(f"SELECT count(*), count(DISTINCT doc_id) FROM {table}")[0]
        assert total == distinct, f"duplicate rows in {table}"
    for table in ("chunks", "chunk_dedup", "embeddings", "quantized_embeddings", "minhash_signatures"):
        total, distinct = warehouse.query_rows(f"SELECT count(*), count(DISTINCT chunk_id) FROM {table}")[0]
        assert total == distinct, f"duplicate rows in {table}: {total} rows, {distinct} chunk ids"
    canonical = warehouse.query_rows(
        "SELECT count(*) FROM chunk_dedup x JOIN chunks USING (chunk_id) WHERE x.status = 'canonical'"
    )[0][0]
    vectors = warehouse.query_rows("SELECT count(*) FROM embeddings")[0][0]
    codes = warehouse.query_rows("SELECT count(*) FROM quantized_embeddings")[0][0]
    assert canonical == vectors == codes > 0
    return vectors


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concurrent")
    for source in ("alpha", "beta"):
        shutil.copytree(FIXTURE_CORPUS / source, tmp / "sources" / source)
    (tmp / "sources" / "alpha" / "empty.txt").write_bytes(b"")  # quarantined: the report must list it
    return tmp


def test_same_partition_twice_at_once(corpus, warehouse_backend, warehouse_databases):
    env = _env(corpus / f"same-{warehouse_backend}", corpus / "sources", warehouse_databases.new(warehouse_backend))
    _init_instance(env)
    a, b = _start(["--source", "alpha"], env), _start(["--source", "alpha"], env)
    results = [_finish(a), _finish(b)]
    for code, report, err in results:
        assert code == 0 or ("error:" in err and "Traceback" not in err), err[-3000:]
    assert any(code == 0 for code, _, _ in results), [err[-1500:] for _, _, err in results]
    vectors = _check_consistent(env["EMBEDDING_HOME"], env.get("EMBEDDING_WAREHOUSE_URL"))
    store = IndexStoreResource(home=env["EMBEDDING_HOME"])
    assert index_count(store.current()) == vectors
    # The CLI's --json report carries the quarantine with path and reason.
    report = next(r for code, r, _ in results if code == 0)
    assert {"source": "alpha", "path": "empty.txt", "kind": "quarantined"}.items() <= next(
        q for q in report["quarantine"] if q["path"] == "empty.txt"
    ).items()
    assert "no text" in next(q for q in report["quarantine"] if q["path"] == "empty.txt")["reason"]


def test_different_partitions_at_once(corpus, warehouse_backend, warehouse_databases):
    env = _env(corpus / f"different-{warehouse_backend}", corpus / "sources", warehouse_databases.new(warehouse_backend))
    _init_instance(env)
    a, b = _start(["--source", "alpha"], env), _start(["--source", "beta"], env)
    (code_a, report_a, err_a), (code_b, report_b, err_b) = _finish(a), _finish(b)
    assert code_a == 0, err_a[-3000:]
    assert code_b == 0, err_b[-3000:]
    vectors = _check_consistent(env["EMBEDDING_HOME"], env.get("EMBEDDING_WAREHOUSE_URL"))
    warehouse = WarehouseResource(home=env["EMBEDDING_HOME"], url=env.get("EMBEDDING_WAREHOUSE_URL"))
    assert {s for (s,) in warehouse.query_rows("SELECT DISTINCT source FROM documents")} == {"alpha", "beta"}
    # Whichever index was published last may predate the other run's vectors; one more build must hold them all.
    rebuild = _start(["--source", "alpha"], env)
    code, report, err = _finish(rebuild)
    assert code == 0, err[-3000:]
    assert report["index"]["row_count"] == vectors
    store = IndexStoreResource(home=env["EMBEDDING_HOME"])
    assert index_count(store.current()) == vectors


def _hold_lock(path: str, ready, release) -> None:
    with file_lock(Path(path), exclusive=True, timeout=5):
        ready.set()
        release.wait(10)


def test_warehouse_lock_excludes_another_process(tmp_path):
    """The flock the warehouse takes really excludes a second process (and a shared lock waits for it)."""
    home = tmp_path / "home"
    warehouse = WarehouseResource(home=str(home), lock_timeout_seconds=0.5)
    warehouse.query_rows("SELECT 1")  # creates the database and the lock file
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(home / "warehouse.lock"), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        with pytest.raises(Exception, match="another run is using the warehouse"):
            warehouse.query_rows("SELECT 1")
        with pytest.raises(Exception, match="another run is using the warehouse"):
            with warehouse.connect():
                pass
        assert time.monotonic() - started >= 1.0
        with pytest.raises(LockTimeout):
            with file_lock(home / "warehouse.lock", exclusive=False, timeout=0.2):
                pass
    finally:
        release.set()
        holder.join(30)
    assert warehouse.query_rows("SELECT 1") == [(1,)]


def _hold_advisory_lock(url: str, key: int, ready, release) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", [key])
        ready.set()
        release.wait(10)


def test_postgres_writer_lock_excludes_another_process_and_readers_never_wait(postgres_server, warehouse_databases):
    """On PostgreSQL the writer lock is an advisory lock: a holder on another connection (another machine) makes
    writers wait and then fail cleanly; readers read their snapshot meanwhile."""
    from resources.warehouse.postgres_backend import WAREHOUSE_LOCK, lock_key

    url = warehouse_databases.new("postgresql")
    warehouse = WarehouseResource(home="/nonexistent-home-is-not-needed", url=url, lock_timeout_seconds=0.5)
    with warehouse.connect() as con:
        con.execute("INSERT INTO meta VALUES ('probe', '1')")
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_advisory_lock, args=(url, lock_key(WAREHOUSE_LOCK), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        started = time.monotonic()
        with pytest.raises(Exception, match="another run is using the warehouse"):
            with warehouse.connect() as con:
                con.execute("INSERT INTO meta VALUES ('blocked', '1')")
        assert time.monotonic() - started >= 0.5
        assert warehouse.query_rows("SELECT value FROM meta WHERE key = 'probe'") == [("1",)]
    finally:
        release.set()
        holder.join(30)
    assert warehouse.query_rows("SELECT count(*) FROM meta WHERE key = 'blocked'") == [(0,)]
    with warehouse.connect() as con:
        con.execute("INSERT INTO meta VALUES ('after', '1')")
    assert warehouse.query_rows("SELECT count(*) FROM meta WHERE key = 'after'") == [(1,)]


def test_index_build_lock_is_a_postgres_advisory_lock_across_stores(postgres_server, warehouse_databases, tmp_path):
    """Two index stores that share nothing on disk (two machines) still exclude each other's builds."""
    from resources.index_store import IndexStoreError

    url = warehouse_databases.new("postgresql")
    first = IndexStoreResource(home=str(tmp_path / "a"), index_dir=str(tmp_path / "shared"), lock_url=url)
    second = IndexStoreResource(home=str(tmp_path / "b"), index_dir=str(tmp_path / "shared"), lock_url=url,
                                build_lock_timeout_seconds=0.5)  # fmt: skip
    with first.build_lock():
        assert not (tmp_path / "shared" / "build.lock").exists(), "no lock file: the lock lives in PostgreSQL"
        with pytest.raises(IndexStoreError, match="another index build is still running"):
            with second.build_lock():
                pass
    with second.build_lock():  # released when the holder's block (its session) ends
        pass
