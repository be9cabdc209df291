"""Freshness on its own: after a sensor-triggered ingest changes a source, the index's automation condition
requests a build, and the build publishes the new text. Real Dagster instance, the real sources sensor and
Dagster's own automation evaluator (the code the daemon's automation sensor runs), the real graph."""

from __future__ import annotations

import os

import dagster as dg
import pytest

from embedding_assets.runner import materialize_index, materialize_source
from embedding_assets.sensors import index_freshness_sensor, sources_sensor
from tests.pipeline_support import make_pipeline

pytestmark = pytest.mark.slow

FAISS_INDEX = dg.AssetKey("faiss_index")
NEW_TEXT = "Quokka census protocol: count the marsupials at dawn along the boardwalk transect."


def _sensor_tick(pipeline, cursor):
    context = dg.build_sensor_context(instance=pipeline.instance, cursor=cursor,
                                      resources={"sources": pipeline.resources["sources"]})
    result = sources_sensor(context)
    for request in result.dynamic_partitions_requests or []:
        pipeline.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def test_sensor_triggered_ingest_leads_to_a_new_index_version_with_the_new_text(tmp_path):
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance)
        # The daemon's automation sensor ticks from the start (every 15 s); nothing is there to index yet.
        evaluation = dg.evaluate_automation_conditions(defs=pipeline.defs, instance=instance)
        assert evaluation.get_num_requested(FAISS_INDEX) == 0
        # The sensor sees both sources, requests their runs; run them as the daemon would.
        first = _sensor_tick(pipeline, None)
        assert {r.partition_key for r in first.run_requests} == {"alpha", "beta"}
        for request in first.run_requests:
            materialize_source(pipeline.defs, instance, request.partition_key)

        # The automation evaluator requests the index once the ingests are done.
        evaluation = dg.evaluate_automation_conditions(defs=pipeline.defs, instance=instance, cursor=evaluation.cursor)
        assert evaluation.get_num_requested(FAISS_INDEX) == 1
        materialize_index(pipeline.defs, instance)
        evaluation = dg.evaluate_automation_conditions(defs=pipeline.defs, instance=instance, cursor=evaluation.cursor)
        assert evaluation.get_num_requested(FAISS_INDEX) == 0, "an index build was requested with nothing new"
        assert not any(NEW_TEXT[:20] in h.text for h in pipeline.search("quokka census at dawn", k=3))

        # A file saved under a source: the sensor requests that partition only...
        note = pipeline.sources_root / "alpha" / "quokka-census.md"
        note.write_text(f"# Quokka census\n\n{NEW_TEXT}\n")
        changed = _sensor_tick(pipeline, first.cursor)
        assert [r.partition_key for r in changed.run_requests] == ["alpha"]
        materialize_source(pipeline.defs, instance, "alpha")

        # ... and the index follows without a person stepping in.
        evaluation = dg.evaluate_automation_conditions(defs=pipeline.defs, instance=instance, cursor=evaluation.cursor)
        assert evaluation.get_num_requested(FAISS_INDEX) == 1
        built = materialize_index(pipeline.defs, instance)
        assert built["build_mode"] in ("incremental", "full")
        hits = pipeline.search("quokka census at dawn", k=3)
        assert hits[0].doc_path == "quokka-census.md" and NEW_TEXT[:20] in hits[0].text


def test_freshness_sensor_is_on_by_default_and_targets_the_index():
    assert index_freshness_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sources_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    selection = index_freshness_sensor.asset_selection
    from embedding_assets.definitions import defs

    assert selection.resolve(defs.resolve_asset_graph()) == {FAISS_INDEX}
    assert os.environ.get("EMBEDDING_AUTOMATION_INTERVAL_SECONDS") or index_freshness_sensor.minimum_interval_seconds == 15
