"""Jobs: ingest one source (stages 1-6, partitioned), build the index (stage 7), remove a source."""

import dagster as dg

from embedding_assets.assets import faiss_index
from embedding_assets.partitions import sources_partitions
from embedding_assets.stages.remove_source import SourceRemovalError, remove_source
from resources import DocumentSourcesResource, WarehouseResource

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


# ---------------------------------------------------------------------------------------------- remove a source

# The assets whose tables hold rows of a source: after a removal each of them holds none for it.
SOURCE_ASSETS = ("raw_documents", "cleaned_documents", "chunks", "deduped_chunks", "embeddings", "quantized_embeddings")


@dg.op(
    description=(
        "Delete every warehouse row of the source named by the run's partition, then its partition. Refuses while the "
        "source folder still exists (the sources sensor would add it back): delete or move the folder first."
    ),
    tags={"kind": "duckdb"},
)
def remove_source_partition(
    context: dg.OpExecutionContext, warehouse: WarehouseResource, sources: DocumentSourcesResource
) -> dg.Output[dict]:
    """Runs ``stages.remove_source.remove_source`` for ``context.partition_key`` (the CLI's remove-source runs this job).

    Reports a materialization with no rows for the source on each partitioned asset, so the UI shows the
    removal in each asset's history and ``faiss_index``'s automation builds an index without its vectors.
    """
    name = context.partition_key
    try:
        report = remove_source(warehouse, context.instance, name, sources_root=sources.root_path)
    except SourceRemovalError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    deleted = sum(report.rows_deleted.values())
    context.log.info(f"removed source {name}: {deleted} rows, partition deleted: {report.partition_deleted}")
    for asset in SOURCE_ASSETS:
        context.log_event(
            dg.AssetMaterialization(
                asset_key=asset, partition=name,
                metadata={"dagster/row_count": 0, "removed_by": "remove_source", "source": name},
            )
        )
    summary = {
        "source": name, "rows_deleted": report.rows_deleted, "partition_deleted": report.partition_deleted,
        "orphaned_duplicates": report.orphaned_duplicates, "sources_to_rerun": report.sources_to_rerun,
    }
    return dg.Output(
        summary,
        metadata={
            "rows_deleted": deleted, "partition_deleted": report.partition_deleted,
            "orphaned_duplicates": report.orphaned_duplicates,
            "sources_to_rerun": ", ".join(report.sources_to_rerun) or "none",
            "rows_deleted_by_table": dg.MetadataValue.json(report.rows_deleted),
        },
    )


@dg.job(
    name="remove_source",
    partitions_def=sources_partitions,
    description=(
        "Remove a source: all its rows in every table and its partition (pick the partition in the launchpad). "
        "For a folder that was deleted or a partition added by mistake; the next faiss_index build (automatic) "
        "holds none of its vectors. `embedding-pipeline remove-source NAME` runs this job."
    ),
    tags={"embedding/trigger": "remove_source"},
)
def remove_source_job():
    remove_source_partition()
