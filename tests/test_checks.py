"""Quality gates of faiss_index on the real graph: they pass on good data, and a failing blocking gate
fails the run and keeps the previous index current."""

from __future__ import annotations

import dagster as dg
import pytest

from embedding_assets.checks import (
    BLOCKING_GATES,
    WARNING_CHECKS,
    CorpusShares,
    QualityGateError,
    snapshot_gates,
    warning_checks,
)
from embedding_assets.runner import RunFailed
from tests.pipeline_support import make_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, instance):
    p = make_pipeline(tmp_path_factory.mktemp("checks"), instance)
    p.run_source("alpha")
    p.run_index()
    return p


def _latest_check_results(instance: dg.DagsterInstance) -> dict[str, tuple[bool, str]]:
    """{check name: (passed, severity)} of the latest evaluation of every faiss_index check."""
    out = {}
    for name in {**BLOCKING_GATES, **WARNING_CHECKS}:
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey("faiss_index"), name), limit=1
        )
        evaluation = records[0].evaluation if records else None
        if hasattr(evaluation, "passed"):  # else only planned in the last run (the step failed earlier)
            out[name] = (evaluation.passed, evaluation.severity.value)
    return out


def test_all_checks_are_evaluated_and_pass_on_good_data(pipeline):
    results = _latest_check_results(pipeline.instance)
    assert set(results) == set(BLOCKING_GATES) | set(WARNING_CHECKS)
    for name in BLOCKING_GATES:
        assert results[name] == (True, "ERROR"), name
    meta = pipeline.run_index()  # unchanged build still reports every gate, read from the kept manifest
    assert isinstance(meta["recall_at_10"], float) and meta["recall_at_10"] >= 0.95
    assert isinstance(meta["bytes_per_vector"], float) and meta["bytes_per_vector"] > 0
    assert "recall_at_10_meets_target" in meta["summary"] and "| metric | value |" in meta["summary"]


def test_gates_read_the_builds_snapshot(pipeline, tmp_path):
    from embedding_assets.stages.faiss_index import take_snapshot

    model = pipeline.resources["model"]
    with pipeline.warehouse.connect(read_only=True) as con:
        snapshot = take_snapshot(con, model.model_fingerprint(), tmp_path)
    limit = model.effective_max_seq_length()  # 384 by default
    gates = {g.name: g for g in snapshot_gates(snapshot.path, dimension=384, max_tokens=limit)}
    assert all(g.passed for g in gates.values()) and gates["vectors_are_unit_norm"].metadata["vectors_checked"] == snapshot.count
    wrong = {g.name: g for g in snapshot_gates(snapshot.path, dimension=768, max_tokens=limit)}
    assert not wrong["vectors_have_model_dimension"].passed and "dimension 768" in wrong["vectors_have_model_dimension"].description
    assert not wrong["codes_have_model_width"].passed
    tight = {g.name: g for g in snapshot_gates(snapshot.path, dimension=384, max_tokens=5)}
    assert not tight["chunk_tokens_within_model_limit"].passed and tight["no_empty_chunks"].passed


def test_warning_checks_flag_jumps_quarantine_and_language_mix():
    shares = CorpusShares(dedup_ratio=0.5, documents=10, quarantined=2, skipped=1, languages={"en": 6, "de": 4})
    by_name = {o.name: o for o in warning_checks(shares, previous_dedup_ratio=0.1)}
    assert not by_name["dedup_ratio_stable"].passed and not by_name["dedup_ratio_stable"].blocking
    assert not by_name["quarantined_or_skipped_share"].passed  # 3 of 11 files
    assert not by_name["language_mix"].passed and by_name["language_mix"].metadata["dominant_language"] == "en"
    calm = {o.name: o for o in warning_checks(
        CorpusShares(0.12, 100, 0, 0, {"en": 100}), previous_dedup_ratio=0.1)}
    assert all(o.passed for o in calm.values())


def test_unreachable_recall_target_keeps_previous_index_current(pipeline):
    store = pipeline.resources["index_store"]
    before = store.current()
    with pytest.raises(RunFailed) as failure:
        pipeline.run_index(index_config={"target_recall": 1.01})
    assert isinstance(failure.value.cause, QualityGateError)
    assert "recall_at_10_meets_target" in str(failure.value)
    assert store.current().version == before.version
    assert not list((store.root / "staging").glob("tmp-*")), "scratch of the refused build was not cleaned up"
    results = _latest_check_results(pipeline.instance)
    assert results["recall_at_10_meets_target"] == (False, "ERROR")


def test_corrupt_vector_blocks_publication(pipeline):
    store = pipeline.resources["index_store"]
    before = store.current()
    # Scale one live canonical vector by 2: finite, right dimension, not unit-norm.
    with pipeline.warehouse.connect() as con:
        chunk = con.execute(
            """SELECT e.chunk_id FROM embeddings e JOIN chunk_dedup x USING (chunk_id)
               WHERE x.status = 'canonical' ORDER BY e.chunk_id LIMIT 1"""
        ).fetchone()[0]
        con.execute("UPDATE embeddings SET vector = list_transform(vector, lambda x: x * 2) WHERE chunk_id = ?", [chunk])
    try:
        with pytest.raises(RunFailed) as failure:
            pipeline.run_index(index_config={"recall_queries": 50})  # a changed setting: a new version would be built
        assert "vectors_are_unit_norm" in str(failure.value) and chunk in str(failure.value)
        assert store.current().version == before.version
        results = _latest_check_results(pipeline.instance)
        assert results["vectors_are_unit_norm"] == (False, "ERROR")
        assert results["vectors_are_finite"] == (True, "ERROR")
    finally:
        with pipeline.warehouse.connect() as con:
            con.execute("UPDATE embeddings SET vector = list_transform(vector, lambda x: x / 2) WHERE chunk_id = ?", [chunk])
