"""The code location: assets, jobs and resources (loaded by `dagster dev -w workspace.yaml`)."""

import dagster as dg

from embedding_assets.assets import PIPELINE_ASSETS
from embedding_assets.jobs import build_index_job, ingest_source_job
from embedding_assets.settings import build_resources


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """Definitions with the given resources (tests, other homes) or the EMBEDDING_* configured ones."""
    return dg.Definitions(
        assets=PIPELINE_ASSETS,
        jobs=[ingest_source_job, build_index_job],
        resources=resources if resources is not None else build_resources(),
    )


defs = build_definitions()
