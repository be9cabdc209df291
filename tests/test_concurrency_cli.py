"""Concurrency through the real CLI (issue 10, class 7): partitions, removal during an ingest, outside readers.

Real processes only: the CLI as subprocesses sharing one EMBEDDING_HOME and one Dagster instance, a
source folder deleted while a run is under way, a second process holding ``warehouse.duckdb`` open
through DuckDB. The Dagster instance's dynamic partitions are read back from DAGSTER_HOME by another
process, as the UI would see them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import pytest

from resources import IndexStoreResource, WarehouseResource
from tests.cli_support import cli, cli_env, cli_popen, copy_corpus, dynamic_partitions, ok, one_error, search_hits
from tests.pipeline_support import FIXTURE_CORPUS, index_count
from tests.test_sources_reliability_reader import OutsideReader

NEW_DOC = "# Moss\n\nMoss and lichen grow on old dry-stone walls; lichen is a fungus living with an alga.\n"


def _read_until(process, wanted: str, timeout: float = 240) -> None:
    """Read the process's stdout until a line equal to ``wanted`` (the CLI prints `source NAME` first)."""
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if line.strip() == wanted:
            return
        assert time.monotonic() < deadline, f"no line {wanted!r} in time"
    raise AssertionError(f"the process ended before printing {wanted!r}: {process.stderr.read()[-3000:]}")


def test_a_mistyped_source_leaves_no_partition_and_runs_nothing(tmp_path):
    copy_corpus(tmp_path / "sources")
    env = cli_env(tmp_path)
    one_error(cli(env, "materialize", "--source", "alpah"), "alpah", "did you mean 'alpha'", code=2)
    # A typo among good names: refused before any run, so the good one is not run either.
    one_error(cli(env, "materialize", "--source", "alpha", "--source", "bta"), "bta", "did you mean 'beta'", code=2)
    one_error(cli(env, "materialize", "--source", "nothing-like-it", "--allow-empty"), "nothing-like-it", code=2)
    one_error(cli(env, "materialize", "--source", "../alpha"), "../alpha", code=1)
    assert dynamic_partitions(tmp_path / "dagster") == []
    assert not (tmp_path / "home" / "warehouse.duckdb").exists()  # nothing ran

    ok(cli(env, "materialize", "--source", "alpha", "--no-index"))
    assert dynamic_partitions(tmp_path / "dagster") == ["alpha"]


def test_a_source_folder_that_vanishes_mid_run_leaves_no_partition_it_added(tmp_path):
    sources = tmp_path / "sources"
    copy_corpus(sources, ("alpha",))
    shutil.copytree(FIXTURE_CORPUS / "beta", sources / "fleeting")
    env = cli_env(tmp_path)

    # `fleeting` passes the name check, then its folder is deleted while alpha runs: its run fails,
    # and the partition that run added is removed again.
    run = cli_popen(env, "materialize", "--source", "alpha", "--source", "fleeting", "--no-index")
    _read_until(run, "source alpha")
    shutil.rmtree(sources / "fleeting")
    out, err = run.communicate(timeout=300)
    done = type("Done", (), {"returncode": run.returncode, "stdout": out, "stderr": err})
    one_error(done, "fleeting", code=1)
    assert dynamic_partitions(tmp_path / "dagster") == ["alpha"]

    # A source that was materialized before keeps its partition and its documents when its folder vanishes
    # (the sensor never deletes on a missing folder; remove-source is the explicit way).
    shutil.copytree(FIXTURE_CORPUS / "beta", sources / "beta")
    ok(cli(env, "materialize", "--source", "beta", "--no-index"))
    run = cli_popen(env, "materialize", "--source", "alpha", "--source", "beta", "--no-index")
    _read_until(run, "source alpha")
    shutil.rmtree(sources / "beta")
    out, err = run.communicate(timeout=300)
    done = type("Done", (), {"returncode": run.returncode, "stdout": out, "stderr": err})
    one_error(done, str(sources / "beta"), code=1)
    assert sorted(dynamic_partitions(tmp_path / "dagster")) == ["alpha", "beta"]
    warehouse = WarehouseResource(home=env["EMBEDDING_HOME"])
    assert warehouse.query_rows("SELECT count(*) FROM documents WHERE source = 'beta'")[0][0] == 4


def _bulk(folder: Path, documents: int) -> None:
    words = sorted(set(re.findall(r"[a-z]{4,}", " ".join(p.read_text().lower() for p in FIXTURE_CORPUS.rglob("*.md")))))
    rng = random.Random(11)
    folder.mkdir(parents=True)
    for i in range(documents):
        (folder / f"note-{i:04d}.txt").write_text(f"Note {i}. " + " ".join(rng.choice(words) for _ in range(14)) + ".\n")


def test_remove_source_while_another_source_ingests(tmp_path):
    sources = tmp_path / "sources"
    copy_corpus(sources)
    env = cli_env(tmp_path)
    ok(cli(env, "materialize"))
    warehouse = WarehouseResource(home=env["EMBEDDING_HOME"])
    _bulk(sources / "bulk", 700)

    ingest = cli_popen(env, "materialize", "--source", "bulk")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and ingest.poll() is None:
        if warehouse.query_rows("SELECT count(*) FROM chunks WHERE source = 'bulk'")[0][0] > 0:
            break
        time.sleep(0.1)
    assert ingest.poll() is None, "the ingest ended before the removal started: " + ingest.communicate()[1][-2000:]
    shutil.rmtree(sources / "beta")
    started = time.monotonic()
    removed = cli(env, "remove-source", "beta", timeout=600)
    removal_seconds = time.monotonic() - started
    assert removed.returncode == 0 and "Traceback" not in removed.stderr, removed.stderr[-3000:]
    assert "removed source beta" in removed.stdout
    out, err = ingest.communicate(timeout=600)
    assert ingest.returncode == 0, err[-3000:]
    report = json.loads(ok(cli(env, "materialize", "--source", "bulk", "--json")).stdout)
    assert report["sources"]["bulk"]["summary"]["documents"]["unchanged"] == 700

    for table in ("documents", "chunks", "chunk_dedup", "embeddings", "quantized_embeddings"):
        assert warehouse.query_rows(f"SELECT count(*) FROM {table} WHERE source = 'beta'")[0][0] == 0, table
    for table in ("chunks", "chunk_dedup", "embeddings", "quantized_embeddings"):
        total, distinct = warehouse.query_rows(f"SELECT count(*), count(DISTINCT chunk_id) FROM {table}")[0]
        assert total == distinct, table
    missing = warehouse.query_rows(
        """SELECT count(*) FROM chunk_dedup x JOIN chunks USING (chunk_id) WHERE x.status = 'canonical'
           AND chunk_id NOT IN (SELECT chunk_id FROM embeddings)"""
    )[0][0]
    assert missing == 0
    vectors = warehouse.query_rows("SELECT count(*) FROM embeddings")[0][0]
    assert warehouse.query_rows("SELECT count(*) FROM documents WHERE source = 'bulk'")[0][0] == 700
    assert index_count(IndexStoreResource(home=env["EMBEDDING_HOME"]).current()) == vectors
    assert all(h["source"] != "beta" for h in search_hits(env, "lighthouse keepers", k=5))
    assert sorted(dynamic_partitions(tmp_path / "dagster")) == ["alpha", "bulk"]
    print(f"remove-source took {removal_seconds:.1f} s while bulk was ingesting")


@pytest.fixture(scope="module")
def materialized(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("reader")
    copy_corpus(base / "sources", ("alpha",))
    ok(cli(cli_env(base), "materialize"))
    return base


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "read-write"])
def test_a_cli_run_waits_for_an_outside_duckdb_connection(read_only, materialized):
    env = cli_env(materialized)
    warehouse = Path(env["EMBEDDING_HOME"]) / "warehouse.duckdb"
    name = f"moss-{'ro' if read_only else 'rw'}.md"
    (Path(env["EMBEDDING_SOURCES_DIR"]) / "alpha" / name).write_text(NEW_DOC.replace("Moss", f"Moss {name}"))
    reader = OutsideReader(warehouse, read_only=read_only, hold_seconds=4)
    try:
        report = json.loads(ok(cli(env, "materialize", "--json")).stdout)
    finally:
        reader.close()
    assert report["sources"]["alpha"]["summary"]["documents"]["added"] == 1
    assert report["sources"]["alpha"]["summary"]["documents"]["deleted"] == 0


def test_an_outside_connection_that_never_closes_fails_the_run_after_the_bound(materialized):
    env = {**cli_env(materialized), "EMBEDDING_LOCK_TIMEOUT_SECONDS": "3"}
    warehouse = Path(env["EMBEDDING_HOME"]) / "warehouse.duckdb"
    (Path(env["EMBEDDING_SOURCES_DIR"]) / "alpha" / "moss-held.md").write_text(NEW_DOC.replace("Moss", "Held moss"))
    reader = OutsideReader(warehouse, read_only=True)
    try:
        started = time.monotonic()
        done = cli(env, "materialize")
        elapsed = time.monotonic() - started
        line = one_error(done, str(warehouse), f"process {reader.pid}", "Reading the warehouse safely", code=1)
        assert "EMBEDDING_LOCK_TIMEOUT_SECONDS" in line
        assert 3 <= elapsed < 120, elapsed
        assert search_hits(env, "honey bees in winter", k=1)  # search is not blocked by the holder
    finally:
        reader.close()
    report = json.loads(ok(cli(env, "materialize", "--json")).stdout)  # the holder gone: the run goes through
    assert report["sources"]["alpha"]["summary"]["documents"]["added"] == 1
