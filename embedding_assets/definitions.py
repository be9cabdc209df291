"""The code location: assets (with their quality checks), jobs, the sources sensor, the index freshness
automation sensor, the nightly reindex schedule and resources (loaded by `dagster dev -w workspace.yaml`
and `dg dev`/`dg check defs` through ``[tool.dg]`` in pyproject.toml).

Everything configurable comes from one ``Settings`` value read here: resources, sensor intervals, the
schedule's cron and each asset's code version.
"""

import dagster as dg

from embedding_assets.assets import PIPELINE_ASSETS
from embedding_assets.cluster.executor import pipeline_executor
from embedding_assets.code_versions import code_versions
from embedding_assets.jobs import build_index_job, index_after_source_removal, ingest_source_job, remove_source_job
from embedding_assets.schedules import build_reindex_schedule
from embedding_assets.sensors import build_index_freshness_sensor, build_sources_sensor, source_folders_check
from embedding_assets.settings import Settings, build_resources, load_settings


def versioned_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """The pipeline's assets with the code version of each derived from ``settings`` (see ``code_versions``)."""
    versions = code_versions(settings)
    return dg.map_asset_specs(
        lambda spec: spec.replace_attributes(code_version=versions[spec.key.to_user_string()]), PIPELINE_ASSETS
    )


def build_definitions(resources: dict | None = None, settings: Settings | None = None) -> dg.Definitions:
    """Definitions from ``settings`` (default: the EMBEDDING_* environment now); ``resources`` replace the
    settings' resources (tests, other homes)."""
    settings = settings or load_settings()
    return dg.Definitions(
        assets=versioned_assets(settings),
        asset_checks=[source_folders_check],
        jobs=[ingest_source_job, build_index_job, remove_source_job],
        sensors=[
            build_sources_sensor(settings.sensor_interval_seconds),
            build_index_freshness_sensor(settings.automation_interval_seconds),
            index_after_source_removal,
        ],
        schedules=[build_reindex_schedule(settings.reindex_cron, settings.reindex_timezone)],
        resources=resources if resources is not None else build_resources(settings),
        # In-process by default (one machine): a run's steps share the model and the warehouse lock, so one
        # process loads the model once per run. EMBEDDING_EXECUTOR=celery fans steps out to workers.
        executor=pipeline_executor(),
    )


defs = build_definitions()


def INGEST_JOB() -> dg.JobDefinition:  # noqa: N802 - module-level targets of dg.reconstructable (Celery workers)
    return defs.resolve_job_def("ingest_source")


def INDEX_JOB() -> dg.JobDefinition:  # noqa: N802
    return defs.resolve_job_def("build_index")
