"""The nightly reindex schedule against a real temporary instance and warehouse."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import pytest

from embedding_assets.definitions import defs
from embedding_assets.schedules import DEFAULT_REINDEX_CRON, build_reindex_schedule, nightly_reindex
from embedding_assets.settings import SettingError
from resources import WarehouseResource

NIGHT = datetime(2026, 3, 1, 3, 0, tzinfo=timezone.utc)


def evaluate(schedule, instance, warehouse):
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=NIGHT, resources={"warehouse": warehouse})
    return schedule(context)


def test_schedule_is_registered_stopped_and_targets_build_index():
    schedule = defs.resolve_schedule_def("nightly_reindex")
    assert schedule.cron_schedule == DEFAULT_REINDEX_CRON
    assert schedule.job_name == "build_index"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    sensor = defs.resolve_sensor_def("sources_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING and sensor.job_name == "ingest_source"


def test_skips_while_nothing_is_indexed(instance, tmp_path):
    result = evaluate(nightly_reindex, instance, WarehouseResource(home=str(tmp_path)))
    assert isinstance(result, dg.SkipReason) and "no live chunks" in result.skip_message


def test_requests_a_build_when_chunks_are_live(instance, tmp_path):
    warehouse = WarehouseResource(home=str(tmp_path))
    with warehouse.connect() as con:
        con.execute("INSERT INTO chunks (chunk_id, source, text) VALUES ('c1', 'alpha', 'text')")
        con.execute("INSERT INTO chunk_dedup (chunk_id, source, status) VALUES ('c1', 'alpha', 'canonical')")
    request = evaluate(nightly_reindex, instance, warehouse)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == f"nightly_reindex:{NIGHT.isoformat()}"
    assert request.tags["embedding/trigger"] == "nightly_reindex"


def test_cron_comes_from_the_environment_and_is_validated(monkeypatch):
    monkeypatch.setenv("EMBEDDING_REINDEX_CRON", "30 1 * * 0")
    assert build_reindex_schedule().cron_schedule == "30 1 * * 0"
    with pytest.raises(SettingError, match="EMBEDDING_REINDEX_CRON='every night'"):
        build_reindex_schedule("every night")
