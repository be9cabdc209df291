"""The code location: assets (with their quality checks), jobs, the sources sensor, the index freshness
automation sensor, the nightly reindex schedule and resources (loaded by `dagster dev -w workspace.yaml`)."""

import dagster as dg

from embedding_assets.assets import PIPELINE_ASSETS
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
        # A run's steps form a chain that shares the model and the warehouse lock: running them in one
        # process loads the model once per run instead of once per step. Runs themselves still go to
        # separate processes (the run launcher), so partitions run in parallel.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
