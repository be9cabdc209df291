"""The warehouse: the one owner of the database, its schema and every query's transaction.

Two backends behind one interface (``connection.WarehouseConnection``), so each stage's SQL is written once:

- **DuckDB** (the embedded default): ``{home}/warehouse.duckdb`` behind an OS file lock (``duckdb_backend``).
- **PostgreSQL** when ``url`` (``EMBEDDING_WAREHOUSE_URL``) is ``postgresql://...``: for runs on several
  machines, writers serialized by an advisory lock, readers on MVCC snapshots (``postgres_backend``).

Every access is a short unit of work through :meth:`WarehouseResource.connect`: a transaction committed
when the block ends and rolled back when it raises. Steps hold it only while they read their inputs or
write a batch, never while they compute embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field

from resources.warehouse.connection import WarehouseConnection
from resources.warehouse.errors import WarehouseError
from resources.warehouse.schema import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION", "WarehouseConnection", "WarehouseError", "WarehouseResource", "arrow_to_vectors",
    "deleted_rows", "insert_arrow", "replace_quarantine", "vectors_to_arrow",
]  # fmt: skip


class WarehouseResource(ConfigurableResource):
    """The warehouse (DuckDB under the home, or PostgreSQL at ``url``), safe to use from many processes at once."""

    home: str = Field(description="Pipeline home folder; the DuckDB database is `{home}/warehouse.duckdb`.")
    url: str | None = Field(
        default=None,
        description="postgresql://user:password@host:port/db selects the PostgreSQL backend (EMBEDDING_WAREHOUSE_URL); "
        "unset: the embedded DuckDB file under `home`.",
    )
    lock_timeout_seconds: float = Field(
        default=900.0,
        description="How long a step waits for another process's write to finish before failing.",
    )

    @property
    def database_url(self) -> str | None:
        """``url`` with a ``dg.EnvVar`` binding resolved (outside a run the field holds the variable's name)."""
        return resolved_url(self.url)

    @property
    def backend(self) -> str:
        """``"postgresql"`` or ``"duckdb"``. Raises WarehouseError for a URL of another database."""
        url = self.database_url
        if not url:
            return "duckdb"
        from resources.warehouse.postgres_backend import is_postgres_url

        if not is_postgres_url(url):
            raise WarehouseError(
                f"EMBEDDING_WAREHOUSE_URL must start with postgresql:// (got {url.split('://', 1)[0]}://...); "
                "unset it to use the embedded DuckDB warehouse"
            )
        return "postgresql"

    @property
    def path(self) -> Path:
        """The DuckDB file (the embedded backend)."""
        return Path(self.home) / "warehouse.duckdb"

    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[WarehouseConnection]:
        """One short unit of work: a connection in one transaction, committed at the end, rolled back on error.

        Writers are serialized across processes (and machines, on PostgreSQL); readers never see a
        half-written unit. Storage and connection failures raise WarehouseError naming what to do.
        """
        if self.backend == "postgresql":
            from resources.warehouse import postgres_backend as backend

            target: Any = self.database_url
        else:
            from resources.warehouse import duckdb_backend as backend

            target = self.path
        with backend.connect(target, read_only=read_only, lock_timeout_seconds=self.lock_timeout_seconds) as con:
            yield con

    def query_rows(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        """Run a read query and return all rows (small results only)."""
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).fetchall()


def resolved_url(value: str | None) -> str | None:
    """A URL field's value: a ``dg.EnvVar`` binding (a str holding the variable's *name*) read from the environment."""
    import dagster as dg

    if isinstance(value, dg.EnvVar):
        return value.get_value() or None
    return value or None


def deleted_rows(con: WarehouseConnection, delete_sql: str, params: list[Any] | None = None) -> int:
    """Run a DELETE and return how many rows it removed."""
    return con.delete(delete_sql, params)


def insert_arrow(con: WarehouseConnection, table: str, columns: dict[str, Any]) -> int:
    """Insert columns (name -> list / numpy / arrow array) into ``table`` in one bulk statement."""
    return con.insert(table, columns)


def replace_quarantine(
    con: WarehouseConnection, stage: str, source: str, doc_ids: list[str], failures: list[tuple[str, str, str, str]]
) -> None:
    """Replace ``stage``'s quarantine records of ``doc_ids`` with ``failures``:
    (doc_id, relative_path, reason, content_sha256) each, recorded now."""
    con.execute("DELETE FROM quarantine WHERE stage = ? AND doc_id IN (SELECT unnest(?::VARCHAR[]))", [stage, list(doc_ids)])
    now = datetime.now(timezone.utc)
    con.insert("quarantine", {
        "doc_id": [f[0] for f in failures], "source": [source] * len(failures),
        "relative_path": [f[1] for f in failures], "stage": [stage] * len(failures),
        "reason": [f[2] for f in failures], "content_sha256": [f[3] for f in failures],
        "recorded_at": [now] * len(failures),
    })  # fmt: skip


def vectors_to_arrow(vectors: np.ndarray) -> pa.Array:
    """(n, dim) float32 -> Arrow list<float> column (a REAL[] column in the warehouse)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray, dim: int | None = None) -> np.ndarray:
    """Arrow list<float> column -> (n, dim) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, dim or 0), dtype=np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(n, -1)
