"""What the UI shows about a table beyond a run's own counts: data versions, column schemas, corpus totals.

- ``partition_data_version``: a digest of what one source's rows of a stage's table hold. A run that
  changed nothing reports the same digest, so Dagster does not mark downstream assets stale after a
  no-op run; any added, changed or removed row changes it.
- ``table_columns``: the columns of a warehouse table as the database reports them (information_schema,
  standard SQL), so the schema shown in the UI can never drift from the table.
- ``corpus_totals``: documents and chunks per source in the warehouse, and vectors per source in a
  published index version (its own chunk map, so it counts what search can find).

Read-only; each takes the warehouse's shared lock for one short read (one unit of work).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resources.warehouse import WarehouseConnection, WarehouseResource

# Per stage: (table, columns whose values are the stage's output for one source, ordering key).
# A column left out here may change without the data version moving, so list every output column
# that a downstream stage reads.
VERSIONED_TABLES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "raw_documents": ("documents", ("relative_path", "content_sha256"), "relative_path"),
    "cleaned_documents": ("cleaned_documents", ("doc_id", "cleaned_sha256", "cleaning_fingerprint"), "doc_id"),
    "chunks": ("chunks", ("chunk_id", "text_sha256", "heading_path", "start_char", "end_char", "page"), "chunk_id"),
    "deduped_chunks": ("chunk_dedup", ("chunk_id", "status", "duplicate_of"), "chunk_id"),
    "embeddings": ("embeddings", ("chunk_id", "model_fingerprint"), "chunk_id"),
    "quantized_embeddings": ("quantized_embeddings", ("chunk_id", "model_fingerprint", "md5(int8)"), "chunk_id"),
}

# The warehouse table behind each partitioned asset (the one its row count is about).
ASSET_TABLES = {asset: table for asset, (table, _, _) in VERSIONED_TABLES.items()}


def partition_signals(warehouse: WarehouseResource, asset: str, source: str) -> tuple[str, list[tuple[str, str]]]:
    """The data version of ``source``'s rows of ``asset`` (``partition_data_version``) and the columns of
    its table (``table_columns``), read in one read-only unit of work (one warehouse open per asset run)."""
    with warehouse.connect(read_only=True) as con:
        return partition_data_version(con, asset, source), table_columns(con, ASSET_TABLES[asset])


def partition_data_version(con: WarehouseConnection, asset: str, source: str) -> str:
    """``rows-<count>-<md5>`` over the stage's output columns of ``source``, in key order.

    The same rows give the same string in every process and run; an empty partition gives
    ``rows-0-<md5 of ''>``. Raises KeyError for an asset without a versioned table.
    """
    table, columns, key = VERSIONED_TABLES[asset]
    values = ", ".join(f"coalesce(CAST({c} AS VARCHAR), '')" for c in columns)
    # Table and column names come from VERSIONED_TABLES above, never from input; the source is a parameter.
    sql = (
        f"SELECT count(*), md5(coalesce(string_agg(concat_ws('|', {values}), chr(10) ORDER BY {key}), '')) "  # noqa: S608 - names are constants of this module
        f"FROM {table} WHERE source = ?"
    )
    count, digest = con.execute(sql, [source]).fetchone()
    return f"rows-{count}-{digest}"


def table_columns(con: WarehouseConnection, table: str) -> list[tuple[str, str]]:
    """(column name, type) of a warehouse table in declaration order; [] before the table exists."""
    # information_schema lists every database attached to the connection (DuckDB attaches each unit
    # of work's file to a shared host), so name this one.
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
        "AND table_schema = current_schema() AND table_catalog = current_database() ORDER BY ordinal_position",
        [table],
    ).fetchall()
    return [(str(name), str(kind)) for name, kind in rows]


@dataclass(frozen=True)
class SourceTotals:
    documents: int = 0
    chunks: int = 0
    canonical_chunks: int = 0
    vectors: int = 0


def corpus_totals(warehouse: WarehouseResource, version_path: Path | None) -> dict[str, SourceTotals]:
    """Per source: live documents and chunks (all, and canonical after dedup) in the warehouse, and the
    vectors the published version at ``version_path`` holds (0 when None)."""
    with warehouse.connect(read_only=True) as con:  # one unit of work: both counts of the same state
        documents = dict(con.execute("SELECT source, count(*) FROM documents GROUP BY 1").fetchall())
        chunks = {
            source: (int(total), int(canonical))
            for source, total, canonical in con.execute(
                """SELECT k.source, count(*), count(*) FILTER (WHERE x.status = 'canonical')
                   FROM chunks k LEFT JOIN chunk_dedup x USING (chunk_id) GROUP BY 1"""
            ).fetchall()
        }
    vectors = vectors_per_source(version_path) if version_path is not None else {}
    return {
        source: SourceTotals(
            documents=int(documents.get(source, 0)), chunks=chunks.get(source, (0, 0))[0],
            canonical_chunks=chunks.get(source, (0, 0))[1], vectors=int(vectors.get(source, 0)),
        )
        for source in sorted(set(documents) | set(chunks) | set(vectors))
    }


def vectors_per_source(version_path: Path) -> dict[str, int]:
    """Rows per source in a version's chunk map (memory-mapped; only the source column is read)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from embedding_assets.core.index_version import CHUNKS_FILE

    with pa.memory_map(str(version_path / CHUNKS_FILE)) as source:
        column = pa.ipc.open_file(source).read_all().column("source")
        counts = pc.value_counts(column)
    return {str(item["values"]): int(item["counts"]) for item in counts.to_pylist()}
