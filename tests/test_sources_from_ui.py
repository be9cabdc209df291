"""Sources managed from the UI, without the model: the remove_source job (the one the UI launches with a
partition key, and the CLI runs), the sensor's report of partitions without a folder (tick and check),
and a partition ingested outside the sensor not being ingested again unchanged."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pytest

from embedding_assets.definitions import build_definitions
from embedding_assets.partitions import SOURCES_PARTITIONS_NAME
from embedding_assets.runner import RunFailed, remove_source_run
from embedding_assets.sensors import MISSING_KEY, SOURCE_FOLDERS_CHECK, source_fingerprint, source_folders_check, sources_sensor
from resources import (
    DocumentSourcesResource,
    EmbeddingCacheResource,
    EmbeddingModelResource,
    IndexStoreResource,
    WarehouseResource,
)
from tests.pipeline_support import FIXTURE_CORPUS


@pytest.fixture
def setup(tmp_path):
    root, home = tmp_path / "sources", tmp_path / "home"
    shutil.copytree(FIXTURE_CORPUS / "alpha", root / "alpha")
    resources = {
        "sources": DocumentSourcesResource(root=str(root)),
        "warehouse": WarehouseResource(home=str(home)),
        "index_store": IndexStoreResource(home=str(home)),
        "model": EmbeddingModelResource(),
        "cache": EmbeddingCacheResource(home=str(home)),
    }
    with dg.instance_for_test() as instance:
        yield root, resources, build_definitions(resources), instance


def seed_rows(warehouse: WarehouseResource, source: str) -> None:
    """One document with one canonical chunk and its vector rows, as a finished ingest leaves them."""
    with warehouse.connect() as con:
        con.execute("INSERT INTO documents (doc_id, source, relative_path) VALUES (?, ?, 'a.md')", [f"d-{source}", source])
        con.execute("INSERT INTO chunks (chunk_id, source, text) VALUES (?, ?, 'text')", [f"c-{source}", source])
        con.execute("INSERT INTO chunk_dedup (chunk_id, source, status) VALUES (?, ?, 'canonical')", [f"c-{source}", source])
        con.execute("INSERT INTO embeddings (chunk_id, source) VALUES (?, ?)", [f"c-{source}", source])
        con.execute("INSERT INTO quantized_embeddings (chunk_id, source) VALUES (?, ?)", [f"c-{source}", source])


def tick(instance, resources, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"sources": resources["sources"]})
    return sources_sensor(context)


def test_remove_source_job_removes_rows_and_partition_and_requests_a_new_index(setup):
    root, resources, defs, instance = setup
    warehouse = resources["warehouse"]
    instance.add_dynamic_partitions(SOURCES_PARTITIONS_NAME, ["alpha", "typo"])
    seed_rows(warehouse, "alpha")
    seed_rows(warehouse, "typo")

    with pytest.raises(RunFailed, match="still exists"):  # the folder is there: the sensor would add it back
        remove_source_run(defs, instance, "alpha")
    assert warehouse.query_rows("SELECT count(*) FROM chunks WHERE source = 'alpha'")[0][0] == 1

    summary = remove_source_run(defs, instance, "typo")
    assert summary["partition_deleted"] and summary["rows_deleted"]["chunks"] == 1
    assert instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME) == ["alpha"]
    for table in ("documents", "chunks", "chunk_dedup", "embeddings", "quantized_embeddings"):
        assert warehouse.query_rows(f"SELECT count(*) FROM {table} WHERE source = 'typo'")[0][0] == 0, table
    assert warehouse.query_rows("SELECT count(*) FROM chunks WHERE source = 'alpha'")[0][0] == 1, "others untouched"

    # The run is in the history as a remove_source run of partition "typo"; its success requests a new index.
    run = instance.get_runs(filters=dg.RunsFilter(job_name="remove_source", statuses=[dg.DagsterRunStatus.SUCCESS]))[0]
    assert run.tags["dagster/partition"] == "typo"
    success = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)[0].dagster_event
    sensor = defs.resolve_sensor_def("index_after_source_removal")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_instance=instance, dagster_run=run, dagster_event=success
    )
    request = sensor(context)
    assert sensor.job_name == "build_index" and request.tags["embedding/removed_source"] == "typo"


def test_sensor_reports_a_partition_without_a_folder_on_its_tick_and_in_the_check(setup):
    root, resources, defs, instance = setup
    instance.add_dynamic_partitions(SOURCES_PARTITIONS_NAME, ["alpha", "alpah"])  # a typo added in the UI
    first = tick(instance, resources)
    evaluations = [e for e in first.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert len(evaluations) == 1 and evaluations[0].check_name == SOURCE_FOLDERS_CHECK and not evaluations[0].passed
    assert "alpah" in evaluations[0].description and "remove_source job" in evaluations[0].description
    assert json.loads(first.cursor)[MISSING_KEY] == "alpah"
    assert "alpah" not in [r.partition_key for r in first.run_requests], "no run for a partition without a folder"

    again = tick(instance, resources, cursor=first.cursor)
    assert again.asset_events == [], "the check is recorded when the set changes, not on every tick"

    instance.delete_dynamic_partition(SOURCES_PARTITIONS_NAME, "alpah")
    fixed = tick(instance, resources, cursor=again.cursor)
    assert [e.passed for e in fixed.asset_events] == [True]
    assert MISSING_KEY not in json.loads(fixed.cursor)

    # Executing the check from the UI gives the same answer.
    instance.add_dynamic_partitions(SOURCES_PARTITIONS_NAME, ["gone"])
    check = source_folders_check(dg.build_asset_check_context(instance=instance), sources=resources["sources"])
    assert not check.passed and check.metadata["partitions_without_folder"].value == ["gone"]


def test_a_source_ingested_outside_the_sensor_is_not_ingested_again_unchanged(setup):
    root, resources, defs, instance = setup
    instance.add_dynamic_partitions(SOURCES_PARTITIONS_NAME, ["alpha"])
    fingerprint = source_fingerprint(root / "alpha")
    # What a UI or CLI run of raw_documents records for the partition.
    instance.report_runless_asset_event(
        dg.AssetMaterialization("raw_documents", partition="alpha", metadata={"source_fingerprint": fingerprint})
    )
    result = tick(instance, resources)  # a fresh cursor: the sensor was just turned on
    assert result.run_requests == [] and json.loads(result.cursor)["alpha"] == fingerprint

    (root / "alpha" / "new.md").write_text("# New\n\nA page saved after the last ingest.\n")
    result = tick(instance, resources, cursor=result.cursor)
    assert [r.partition_key for r in result.run_requests] == ["alpha"]
