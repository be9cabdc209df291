"""The code location: assets (with their quality checks), jobs, the sources sensor, the index freshness
automation sensor, the nightly reindex schedule and resources (loaded by `dagster dev -w workspace.yaml`)."""

import dagster as dg

from embedding_assets.assets import PIPELINE_ASSETS
from embedding_assets.cluster.executor import pipeline_executor
from embedding_assets.jobs import build_index_job, ingest_source_job
from embedding_assets.schedules import nightly_reindex
from embedding_assets.sensors import index_freshness_sensor, sources_sensor
from embedding_assets.settings import build_resources


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """Definitions with the given resources (tests, other homes) or the EMBEDDING_* configured ones."""
    return dg.Definitions(
        assets=PIPELINE_ASSETS,
        jobs=[ingest_source_job, build_index_job],
        sensors=[sources_sensor, index_freshness_sensor],
        schedules=[nightly_reindex],
        resources=resources if resources is not None else build_resources(),
        # In-process by default (one machine); EMBEDDING_EXECUTOR=celery fans steps out to workers.
        executor=pipeline_executor(),
    )


defs = build_definitions()


def INGEST_JOB() -> dg.JobDefinition:  # noqa: N802 - module-level targets of dg.reconstructable (Celery workers)
    return defs.resolve_job_def("ingest_source")


def INDEX_JOB() -> dg.JobDefinition:  # noqa: N802
    return defs.resolve_job_def("build_index")
