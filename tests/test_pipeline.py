"""The whole asset graph on the fixture corpus: real model, real DuckDB, real Dagster jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml

from embedding_assets.core.identity import vector_id
from embedding_assets.core.index_version import IndexVersion
from tests.pipeline_support import QUERIES, make_pipeline

# Runs the asset graph with the real model (in process or through the CLI): `make test-fast` skips it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory, instance, warehouse_backend, warehouse_databases):
    """Both fixture sources materialized once, then the index; shared by the read-only tests here
    (once per warehouse backend)."""
    pipeline = make_pipeline(
        tmp_path_factory.mktemp("graph"), instance, warehouse_url=warehouse_databases.new(warehouse_backend)
    )
    reports, index = pipeline.run_all()
    return pipeline, reports, index


def test_definitions_load_and_workspace_points_at_them():
    from embedding_assets.definitions import defs

    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {
        "raw_documents", "cleaned_documents", "chunks", "deduped_chunks",
        "embeddings", "quantized_embeddings", "faiss_index",
    }
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    module = workspace["load_from"][0]["python_module"]["module_name"]
    assert module == "embedding_assets.definitions"
    defs.resolve_job_def("ingest_source")
    defs.resolve_job_def("build_index")


def test_full_graph_reports_every_stage(built):
    pipeline, reports, index = built
    alpha = reports["alpha"]
    assert set(alpha) == {"raw_documents", "cleaned_documents", "chunks", "deduped_chunks", "embeddings", "quantized_embeddings"}
    assert alpha["raw_documents"]["added"] == 6 and alpha["raw_documents"]["row_count"] == 6
    assert reports["beta"]["raw_documents"]["added"] == 4
    assert alpha["chunks"]["max_token_count"] <= alpha["chunks"]["token_limit"]
    live = pipeline.rows(
        "SELECT count(*) FROM chunk_dedup x JOIN chunks USING (chunk_id) WHERE x.status = 'canonical'"
    )[0][0]
    assert index["row_count"] == live
    embedded = sum(r["embeddings"]["embedded_by_model"] for r in reports.values())
    assert embedded == live  # every canonical chunk embedded exactly once, duplicates never
    assert alpha["quantized_embeddings"]["bytes_per_vector_int8"] == 384
    assert alpha["quantized_embeddings"]["bytes_per_vector_binary"] == 48
    assert 0.95 <= index["recall_at_10"] <= 1.0


def test_cross_partition_duplicates_keep_provenance(built):
    pipeline, reports, _ = built
    rows = pipeline.rows(
        """SELECT d.relative_path, x.status, od.relative_path
           FROM chunks k JOIN documents d USING (doc_id) JOIN chunk_dedup x USING (chunk_id)
           LEFT JOIN chunks o ON o.chunk_id = x.duplicate_of LEFT JOIN documents od ON od.doc_id = o.doc_id
           WHERE k.source = 'beta' AND d.relative_path IN ('starter-notes.md', 'rock-pools.html')"""
    )
    copy = [r for r in rows if r[0] == "starter-notes.md"]
    assert copy and all(status == "exact_duplicate" and orig == "sourdough-starter.md" for _, status, orig in copy)
    # rock-pools.html is tide-pools.html with one sentence changed: every other chunk is a duplicate.
    near = [r for r in rows if r[0] == "rock-pools.html"]
    duplicates = [r for r in near if r[1] != "canonical"]
    # One chunk at the default size (382 tokens), two or more at smaller ones: all but at most one (the
    # changed sentence's, when its similarity falls under the threshold) are duplicates of tide-pools.html.
    assert near and len(duplicates) >= max(1, len(near) - 1)
    assert all(orig == "tide-pools.html" for _, _, orig in duplicates)


def test_near_duplicate_across_partitions(tmp_path, instance, warehouse_backend, warehouse_databases):
    pipeline = make_pipeline(tmp_path, instance, copy_corpus=False, warehouse_url=warehouse_databases.new(warehouse_backend))
    words = (ROOT / "tests/fixtures/corpus/alpha/chess-endgames.txt").read_text().split()[:150]
    text = " ".join(words)
    edited = " ".join(words[:70] + ["quietly"] + words[71:])
    (pipeline.sources_root / "one").mkdir()
    (pipeline.sources_root / "two").mkdir()
    (pipeline.sources_root / "one" / "log.txt").write_text(text)
    (pipeline.sources_root / "two" / "log-copy.txt").write_text(edited)
    pipeline.run_source("one")
    report = pipeline.run_source("two")["deduped_chunks"]
    assert report["near_duplicates"] == 1 and report["exact_duplicates"] == 0
    (status, similarity, original), = pipeline.rows(
        "SELECT x.status, x.similarity, o.text FROM chunk_dedup x JOIN chunks k USING (chunk_id) "
        "JOIN chunks o ON o.chunk_id = x.duplicate_of WHERE k.source = 'two'"
    )
    assert status == "near_duplicate" and 0.8 <= similarity < 1.0 and original == text


@pytest.mark.parametrize("case", QUERIES, ids=[q["expected_path"] for q in QUERIES])
def test_search_finds_the_expected_document(built, case):
    pipeline, _, _ = built
    hits = pipeline.search(case["query"], k=3)
    assert hits, "no hits"
    assert f"{hits[0].source}/{hits[0].doc_path}" == case["expected_path"]


def test_published_index_maps_ids_back_to_chunks(built):
    pipeline, _, index = built
    published = pipeline.resources["index_store"].current()
    assert published.version == index["version"]
    manifest = published.manifest
    assert manifest["dimension"] == 384 and manifest["metric"] == "inner_product"
    assert manifest["model_fingerprint"] == pipeline.resources["model"].model_fingerprint()
    version = IndexVersion.open(published.path, verify="full")
    assert version.index.ntotal == manifest["count"] == version.chunks.num_rows
    rows = pipeline.rows(
        """SELECT e.chunk_id, e.vector, k.text, k.source, d.relative_path FROM embeddings e
           JOIN chunks k USING (chunk_id) JOIN documents d USING (doc_id) ORDER BY e.chunk_id LIMIT 5""")
    for chunk, vector, text, source, path in rows:
        _, found = version.search(np.asarray([vector], dtype=np.float32), 1)
        assert int(found[0][0]) == vector_id(chunk)
        row, = version.chunk_rows(version.rows_of([vector_id(chunk)]))
        assert (row["chunk_id"], row["text"], row["source"], row["doc_path"]) == (chunk, text, source, path)


def test_second_materialize_with_nothing_changed_embeds_nothing(built):
    pipeline, _, _ = built
    before = pipeline.rows("SELECT count(*), string_agg(md5(chunk_id || text), ',' ORDER BY chunk_id) FROM chunks")
    again = {s: pipeline.run_source(s) for s in ("alpha", "beta")}
    for report in again.values():
        assert report["raw_documents"]["added"] == report["raw_documents"]["updated"] == 0
        assert report["cleaned_documents"]["cleaned"] == 0
        assert report["chunks"]["documents_chunked"] == 0
        assert report["deduped_chunks"]["decided"] == 0
        assert report["embeddings"]["embedded_by_model"] == 0
        assert report["quantized_embeddings"]["quantized"] == 0
    assert pipeline.rows("SELECT count(*), string_agg(md5(chunk_id || text), ',' ORDER BY chunk_id) FROM chunks") == before


def test_cli_materialize_search_and_remove_source(tmp_path):
    """The console script end to end in fresh processes, with its own home and DAGSTER_HOME."""
    sources = tmp_path / "sources"
    for source, name in (("alpha", "chess-endgames.txt"), ("beta", "winter-beekeeping.md")):
        (sources / source).mkdir(parents=True)
        (sources / source / name).write_bytes((ROOT / "tests/fixtures/corpus/alpha" / name).read_bytes())
    env = {
        **os.environ,
        "EMBEDDING_HOME": str(tmp_path / "home"),
        "EMBEDDING_SOURCES_DIR": str(sources),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
    }
    env.pop("EMBEDDING_REDIS_URL", None)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "embedding_assets.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )

    done = cli("materialize", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["sources"]["alpha"]["assets"]["raw_documents"]["added"] == 1
    assert report["sources"]["beta"]["summary"]["documents"]["added"] == 1
    assert report["index"]["row_count"] >= 2
    found = cli("search", "king and pawn opposition", "--k", "2", "--json")
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(hits) == 2 and {"chunk_id", "doc_path", "score", "text"} <= set(hits[0])
    assert hits[0]["doc_path"] == "chess-endgames.txt"

    refused = cli("remove-source", "beta")  # the folder still exists: the sensor would add it back
    assert refused.returncode != 0 and "still exists" in refused.stderr
    shutil.rmtree(sources / "beta")
    removed = cli("remove-source", "beta")
    assert removed.returncode == 0, removed.stderr
    found = cli("search", "bees in the cold months", "--k", "5", "--json")
    assert {json.loads(line)["source"] for line in found.stdout.splitlines()} == {"alpha"}
    # The runs are in the same instance the UI reads.
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as inst:
        # Two sources, the index, the removal (the remove_source job the UI launches too), the index after it;
        # the refused removal left no run.
        jobs = sorted(run.job_name for run in inst.get_runs())
        assert jobs == ["build_index", "build_index", "ingest_source", "ingest_source", "remove_source"], jobs


def test_redis_tier_shares_vectors_with_another_process(tmp_path, instance, redis_server):
    """A run in this process fills Redis; a CLI run in another process with an empty home embeds nothing."""
    first = make_pipeline(tmp_path / "first", instance, redis_url=redis_server.url)
    report = first.run_source("alpha")
    embedded = report["embeddings"]["embedded_by_model"]
    assert embedded > 0 and report["embeddings"]["redis_status"] == "ok"
    env = {
        **os.environ,
        "EMBEDDING_HOME": str(tmp_path / "second-home"),
        "EMBEDDING_SOURCES_DIR": str(first.sources_root),
        "DAGSTER_HOME": str(tmp_path / "second-dagster"),
        "EMBEDDING_REDIS_URL": redis_server.url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "embedding_assets.cli", "materialize", "--source", "alpha", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["sources"]["alpha"]["summary"]
    assert summary["embedded_by_model"] == 0
    assert summary["cache_hits"]["redis"] == embedded and summary["cache_hits"]["disk"] == 0
