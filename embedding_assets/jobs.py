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

    The partition is gone afterwards, so no asset event can carry the change; ``index_after_source_removal``
    requests a ``build_index`` run once this job succeeds.
    """
    name = context.partition_key
    try:
        report = remove_source(warehouse, context.instance, name, sources_root=sources.root_path)
    except SourceRemovalError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    deleted = sum(report.rows_deleted.values())
    context.log.info(f"removed source {name}: {deleted} rows, partition deleted: {report.partition_deleted}")
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
        "For a folder that was deleted or a partition added by mistake; a build_index run follows on success "
        "(index_after_source_removal), so the index holds none of its vectors. `embedding-pipeline remove-source NAME` runs this job."
    ),
    tags={"embedding/trigger": "remove_source"},
)
def remove_source_job():
    remove_source_partition()


@dg.run_status_sensor(
    name="index_after_source_removal",
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[remove_source_job],
    request_job=build_index_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a remove_source run succeeds, builds a new index version without the removed source's vectors.",
)
def index_after_source_removal(context: dg.RunStatusSensorContext) -> dg.RunRequest:
    run = context.dagster_run
    return dg.RunRequest(
        run_key=f"index_after_source_removal:{run.run_id}",
        tags={"embedding/trigger": "remove_source", "embedding/removed_source": run.tags.get("dagster/partition", "")},
    )
