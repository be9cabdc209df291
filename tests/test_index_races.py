"""The index build under concurrent writers: it waits for ingest runs still embedding, notices a
writer that raced with it, and never publishes an index that mixes two states of the corpus."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np
import pytest
from dagster._core.test_utils import create_run_for_test

import dagster as dg
from embedding_assets.core.ivf import read_index
from embedding_assets.inflight import HOST_TAG, PARTITION_TAG, PID_TAG, ingests_in_flight, run_tags
from embedding_assets.stages.embeddings import embed_source
from embedding_assets.stages.faiss_index import (
    CorpusChanged,
    IndexSettings,
    MissingVectors,
    _fetch,
    build_and_publish,
    live_snapshot,
)
from tests.pipeline_support import make_pipeline
from tests.test_index_lifecycle import DIM, FP, add_rows, build, clustered, remove_rows, stores  # noqa: F401 - fixture


class _WriterDuringBuild:
    """An index store whose scratch folder opens only after another 'run' has written to the warehouse."""

    def __init__(self, store, write):
        self._store, self._write = store, write

    def current(self):
        return self._store.current()

    @contextlib.contextmanager
    def new_version(self):
        self._write()
        with self._store.new_version() as scratch:
            yield scratch

    def publish(self, scratch, manifest):
        return self._store.publish(scratch, manifest)


@pytest.mark.parametrize("change", ["add", "remove"])
def test_a_writer_during_the_build_is_caught_before_publish(stores, change):
    warehouse, index_store = stores
    centers = clustered(8, 0, np.eye(8, DIM, dtype=np.float32))
    ids = add_rows(warehouse, 0, clustered(400, 1, centers))
    build(stores)
    before = index_store.current().version
    add_rows(warehouse, 400, clustered(50, 2, centers))  # so the next build has work to do

    def write():
        if change == "add":
            add_rows(warehouse, 1000, clustered(5, 3, centers))
        else:
            remove_rows(warehouse, ids[:5])

    with pytest.raises(CorpusChanged, match="while the index was being built"):
        build_and_publish(
            warehouse, _WriterDuringBuild(index_store, write), model_fingerprint=FP, dimension=DIM,
            settings=IndexSettings(),
        )
    assert index_store.current().version == before
    report, published = build(stores)  # nobody writing now: the retry succeeds and holds everything
    assert report.count == read_index(published.index_file).ntotal == live_snapshot(warehouse, FP).canonical


def test_fetch_refuses_vectors_deleted_under_it(stores):
    warehouse, _ = stores
    ids = add_rows(warehouse, 0, clustered(10, 1, np.eye(4, DIM, dtype=np.float32)))
    vector_ids = np.array([r[0] for r in warehouse.query_rows("SELECT vector_id FROM chunks ORDER BY vector_id")])
    remove_rows(warehouse, ids[:1])
    with pytest.raises(CorpusChanged, match="1 of 10 vectors were deleted"):
        _fetch(warehouse, FP, vector_ids, DIM)


def test_snapshot_sees_chunks_without_vectors(stores):
    warehouse, _ = stores
    add_rows(warehouse, 0, clustered(10, 1, np.eye(4, DIM, dtype=np.float32)))
    first = live_snapshot(warehouse, FP)
    assert first.canonical == first.with_vectors == 10
    with warehouse.connect() as con:
        con.execute("DELETE FROM embeddings WHERE chunk_id = (SELECT min(chunk_id) FROM embeddings)")
    second = live_snapshot(warehouse, FP)
    assert (second.canonical, second.with_vectors) == (10, 9) and second.vector_digest != first.vector_digest
    with pytest.raises(MissingVectors, match="synthetic: 1"):
        build(stores)


# ------------------------------------------------------------------ real graph, runs in the instance


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, instance):
    p = make_pipeline(tmp_path_factory.mktemp("races"), instance)
    p.run_all()
    return p


def _unembed(pipeline, source: str) -> int:
    """Put a source back where an ingest run is between chunking and embedding: chunks without vectors."""
    with pipeline.warehouse.connect() as con:
        return len(con.execute("DELETE FROM embeddings WHERE source = ? RETURNING 1", [source]).fetchall())


def _in_flight_run(instance, source: str):
    """An ingest run of ``source`` recorded as started by a live process (this one)."""
    return create_run_for_test(
        instance, job_name="ingest_source", status=dg.DagsterRunStatus.STARTED,
        tags={PARTITION_TAG: source, **run_tags()},
    )


def _build(pipeline) -> dg.ExecuteInProcessResult:
    return pipeline.defs.resolve_job_def("build_index").execute_in_process(
        instance=pipeline.instance, raise_on_error=False, tags=run_tags()
    )


def test_build_waits_for_an_ingest_still_embedding_then_holds_its_vectors(pipeline):
    assert _unembed(pipeline, "beta") > 0
    run = _in_flight_run(pipeline.instance, "beta")
    assert "beta" in ingests_in_flight(pipeline.instance)
    delay = 3.0

    def finish_ingest():
        time.sleep(delay)
        r = pipeline.resources
        embed_source(r["warehouse"], "beta", model=r["model"], cache=r["cache"])
        pipeline.instance.report_run_failed(run, "test: the ingest run ends")  # any end status releases the wait

    writer = threading.Thread(target=finish_ingest)
    started = time.monotonic()
    writer.start()
    result = _build(pipeline)
    writer.join()
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert time.monotonic() - started >= delay
    logs = [e.user_message for e in pipeline.instance.all_logs(result.run_id)]
    assert any("(beta: " in m and "waiting for 1 ingest run(s) in flight" in m for m in logs), logs
    snapshot = live_snapshot(pipeline.warehouse, pipeline.resources["model"].model_fingerprint())
    assert snapshot.canonical == snapshot.with_vectors
    current = pipeline.resources["index_store"].current()
    assert read_index(current.index_file).ntotal == snapshot.canonical


def test_build_fails_at_once_when_no_run_will_embed_the_missing_chunks(pipeline):
    before = pipeline.resources["index_store"].current().version
    assert _unembed(pipeline, "alpha") > 0
    started = time.monotonic()
    result = _build(pipeline)
    assert not result.success and time.monotonic() - started < 60
    error = next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.cause
    assert error.cls_name == "MissingVectors" and "(alpha: " in error.message
    assert "materialize embeddings for those sources first" in error.message
    assert pipeline.resources["index_store"].current().version == before
    pipeline.run_source("alpha")  # leave the module's pipeline whole


def test_a_dead_ingest_run_is_released_not_waited_for(pipeline):
    """An ingest run whose process is gone (SIGKILL) is marked failed, so the build fails fast instead of waiting."""
    assert _unembed(pipeline, "beta") > 0
    dead = create_run_for_test(
        pipeline.instance, job_name="ingest_source", status=dg.DagsterRunStatus.STARTED,
        tags={PARTITION_TAG: "beta", PID_TAG: str(_dead_pid()), HOST_TAG: run_tags()[HOST_TAG]},
    )
    result = _build(pipeline)
    assert not result.success
    assert pipeline.instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
    pipeline.run_source("beta")


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_write_just_before_the_gates_is_a_changed_corpus_not_a_failed_gate(stores):
    """The last window: a run writes after the build's own last look, right before the publish gates."""
    from embedding_assets.checks import GatedIndexStore

    warehouse, index_store = stores
    centers = clustered(8, 0, np.eye(8, DIM, dtype=np.float32))
    add_rows(warehouse, 0, clustered(400, 1, centers))
    build(stores)
    before = index_store.current().version
    add_rows(warehouse, 400, clustered(50, 2, centers))
    gated = GatedIndexStore(index_store, warehouse)

    class WriteThenGate(_WriterDuringBuild):
        def new_version(self):
            return self._store.new_version()

        def publish(self, scratch, manifest):
            self._write()
            return self._store.publish(scratch, manifest)

    with pytest.raises(CorpusChanged):
        build_and_publish(
            warehouse, WriteThenGate(gated, lambda: add_rows(warehouse, 1000, clustered(5, 3, centers))),
            model_fingerprint=FP, dimension=DIM, settings=IndexSettings(),
        )
    assert gated.outcomes == [] and index_store.current().version == before
