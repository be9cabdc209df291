"""Removing a source: its rows in every warehouse table and its dynamic partition.

The sensor never deletes a source whose folder disappeared (a moved or unmounted folder must not
wipe vectors); this is the explicit command behind ``embedding-pipeline remove-source NAME``.
The next ``faiss_index`` build holds none of its vectors.

Chunks of OTHER sources that were duplicates of a removed chunk lose their dedup decision here; the
next dedup run (any source) decides them again, and those that become canonical need an ingest run of
their own source to get vectors (``RemovalReport.sources_to_rerun``). Until then they are simply not
in the index. Cached embeddings are kept: they are keyed by content and model, not by source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from embedding_assets.core.sources import source_dir
from resources.warehouse import WarehouseResource

# Tables keyed by source, deleted last (chunk-keyed tables are cleaned first through the chunk ids).
_SOURCE_TABLES = (
    "embeddings", "quantized_embeddings", "chunks", "chunked_documents",
    "cleaned_documents", "quarantine", "skipped_files", "documents",
)  # fmt: skip


class SourceRemovalError(ValueError):
    """A source cannot be removed (unknown, or its folder still exists); the message says what to do."""


class DynamicPartitionStore(Protocol):
    """What remove_source needs of a Dagster instance."""

    def has_dynamic_partition(self, partitions_def_name: str, partition_key: str) -> bool: ...
    def delete_dynamic_partition(self, partitions_def_name: str, partition_key: str) -> None: ...


@dataclass
class RemovalReport:
    source: str
    rows_deleted: dict[str, int] = field(default_factory=dict)
    orphaned_duplicates: int = 0  # other sources' chunks whose canonical copy was removed
    sources_to_rerun: list[str] = field(default_factory=list)
    partition_deleted: bool = False


def refuse_while_folder_exists(sources_root: Path, name: str) -> None:
    """Raises SourceRemovalError while the source's folder exists (the sensor would add the partition back)."""
    if source_dir(sources_root, name).exists():
        raise SourceRemovalError(
            f"source folder {source_dir(sources_root, name)} still exists: delete or move it first, "
            "or the sources sensor adds the partition back"
        )


def remove_source(
    warehouse: WarehouseResource,
    instance: DynamicPartitionStore,
    name: str,
    *,
    sources_root: Path | None = None,
) -> RemovalReport:
    """Delete every warehouse row of source ``name`` and its dynamic partition, in one transaction.

    With ``sources_root``, refuses while the folder still exists (the sensor would add it back).
    Raises SourceRemovalError when the source has neither rows nor a partition.
    """
    from embedding_assets.partitions import SOURCES_PARTITIONS_NAME  # keeps this module free of Dagster at import

    if sources_root is not None:
        refuse_while_folder_exists(sources_root, name)
    report = RemovalReport(source=name)
    with warehouse.connect() as con:
        con.execute("CREATE TEMP TABLE removed_chunks AS SELECT chunk_id FROM chunks WHERE source = ?", [name])
        orphans = con.execute(
            """SELECT chunk_id, source FROM chunk_dedup
               WHERE duplicate_of IN (SELECT chunk_id FROM removed_chunks) AND source <> ?""",
            [name],
        ).fetchall()
        report.orphaned_duplicates = len(orphans)
        report.sources_to_rerun = sorted({source for _, source in orphans})
        report.rows_deleted["chunk_dedup"] = con.delete(
            """DELETE FROM chunk_dedup WHERE source = ? OR chunk_id IN (SELECT chunk_id FROM removed_chunks)
               OR duplicate_of IN (SELECT chunk_id FROM removed_chunks)""",
            [name],
        )
        for table in ("minhash_bands", "minhash_signatures"):
            report.rows_deleted[table] = con.delete(
                f"DELETE FROM {table} WHERE chunk_id IN (SELECT chunk_id FROM removed_chunks)"  # noqa: S608 - table names are constants of this module
            )
        for table in _SOURCE_TABLES:
            report.rows_deleted[table] = con.delete(f"DELETE FROM {table} WHERE source = ?", [name])  # noqa: S608 - table names are constants of this module; values are parameters
        con.execute("DROP TABLE removed_chunks")
    if instance.has_dynamic_partition(SOURCES_PARTITIONS_NAME, name):
        instance.delete_dynamic_partition(SOURCES_PARTITIONS_NAME, name)
        report.partition_deleted = True
    if not report.partition_deleted and not any(report.rows_deleted.values()):
        raise SourceRemovalError(f"no source named {name!r}: it has no partition and no rows in the warehouse")
    return report
