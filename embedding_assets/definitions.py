"""The code location: assets, jobs and resources (loaded by `dagster dev -w workspace.yaml`)."""

import dagster as dg

from embedding_assets.assets import PIPELINE_ASSETS
from embedding_assets.jobs import build_index_job, ingest_source_job
from embedding_assets.settings import build_resources

defs = dg.Definitions(
    assets=PIPELINE_ASSETS,
    jobs=[ingest_source_job, build_index_job],
    resources=build_resources(),
)
