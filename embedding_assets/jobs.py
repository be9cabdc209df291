"""Jobs: ingest one source (stages 1-6, partitioned) and build the index (stage 7)."""

import dagster as dg

from embedding_assets.assets import faiss_index
from embedding_assets.partitions import sources_partitions

ingest_source_job = dg.define_asset_job(
    name="ingest_source",
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(faiss_index),
    partitions_def=sources_partitions,
    description="Read, clean, chunk, dedup, embed and quantize one source (partition), doing only changed work.",
)

build_index_job = dg.define_asset_job(
    name="build_index",
    selection=dg.AssetSelection.assets(faiss_index),
    description="Build the FAISS index over all sources and publish it atomically.",
)
