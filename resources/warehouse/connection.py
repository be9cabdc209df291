"""The small interface every stage writes its SQL against, once for both backends.

Stages speak portable SQL with ``?`` placeholders through :class:`WarehouseConnection`; the few things
DuckDB and PostgreSQL truly do differently are methods here, each backend implementing them its own way:

- bulk paths: ``insert`` (Arrow scan / ``COPY``), ``fetch_arrow``, ``write_parquet``, ``scratch_table``;
- ``delete`` returning the number of rows removed (DuckDB answers a DELETE with a row, PostgreSQL with a status);
- two SQL fragments: ``invalid_vector`` (list functions / ``unnest``) and ``row_hash``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa


class Cursor(Protocol):
    def fetchone(self) -> tuple | None: ...
    def fetchall(self) -> list[tuple]: ...


class WarehouseConnection(Protocol):
    """One unit of work of either backend (a transaction, committed when the ``connect`` block ends)."""

    dialect: str  # "duckdb" or "postgresql"

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Cursor:
        """Run one statement with ``?`` placeholders (a list parameter binds to ``?::VARCHAR[]``)."""

    def delete(self, sql: str, params: Sequence[Any] | None = None) -> int:
        """Run a DELETE and return how many rows it removed."""

    def insert(self, table: str, columns: dict[str, Any]) -> int:
        """Insert columns (name -> list / numpy / Arrow array, equal lengths) into ``table``; returns the row count."""

    def fetch_arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """A query's whole result as an Arrow table (list columns as Arrow lists)."""

    def write_parquet(self, sql: str, params: Sequence[Any] | None, path: Path, *, schema: pa.Schema, row_group_size: int) -> None:
        """Write a query's result to a Parquet file without holding it all in memory; columns follow ``schema``."""

    def scratch_table(self, name: str, columns: dict[str, Any], types: dict[str, str]) -> contextlib.AbstractContextManager[None]:
        """A temporary table ``name`` holding ``columns`` (SQL ``types`` per column) for the block, dropped after."""

    def invalid_vector(self, column: str) -> str:
        """SQL that is true when the REAL[] ``column`` is not a unit vector of the right dimension; it takes two
        parameters, the dimension and the norm tolerance (the SQL form of ``core.vector_checks.invalid_rows``)."""

    def row_hash(self, *expressions: str) -> str:
        """SQL for a 64-bit integer hash of the expressions' values (stable within one backend)."""


@contextlib.contextmanager
def scratch_table_by_sql(con, name: str, columns: dict[str, Any], types: dict[str, str]) -> Iterator[None]:
    """``scratch_table`` in plain SQL: CREATE TEMP TABLE, insert, DROP (used by both backends)."""
    con.execute(f"CREATE TEMP TABLE {name} ({', '.join(f'{c} {types[c]}' for c in columns)})")
    try:
        con.insert(name, columns)
        yield
    finally:
        con.execute(f"DROP TABLE IF EXISTS {name}")
