"""The shared backend: PostgreSQL through psycopg 3, for runs on several machines at once.

Concurrency without an OS file lock:

- **Writers** are serialized by a transaction-level advisory lock (``pg_advisory_xact_lock``) taken as the
  first statement of every write unit of work, so each one sees every earlier writer's committed rows: the
  same order the DuckDB file lock gives, but across machines. It is released by COMMIT or ROLLBACK, and by
  the server when a worker dies mid-transaction (nothing of that unit is kept). ``lock_timeout`` bounds the
  wait (``lock_timeout_seconds``).
- **Readers** take no lock: a ``REPEATABLE READ READ ONLY`` transaction sees one consistent snapshot for
  all its statements (the index build exports the live set in one), and never waits for a writer.

Connection failures (server down, restarted mid-run) and lock timeouts become WarehouseError naming the
server (password masked) and what to do; SQL errors of the query itself (a bug) are raised as they are.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pyarrow as pa
import pyarrow.parquet as pq

from resources.cache.urls import mask_redis_url as mask_url  # masks any URL's password, not only Redis'
from resources.locks import LockTimeout
from resources.warehouse.connection import scratch_table_by_sql
from resources.warehouse.errors import WarehouseError
from resources.warehouse.schema import SCHEMA_VERSION, SchemaMismatch, ensure_schema

CONNECT_TIMEOUT_SECONDS = 10
URL_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")

# (url, pid) whose schema this process has checked: the check runs once per process, not per unit of work.
_SCHEMA_READY: set[tuple[str, int]] = set()


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and url.startswith(URL_SCHEMES)


def lock_key(name: str) -> int:
    """The signed 64-bit advisory lock key of ``name`` (one key per purpose, the same on every machine)."""
    return int.from_bytes(hashlib.sha256(f"embedding_pipeline:{name}".encode()).digest()[:8], "big", signed=True)


WAREHOUSE_LOCK = "warehouse_writer"


@functools.lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (and a literal ``%`` to ``%%``), outside quoted strings."""
    out, quote = [], None
    for ch in sql:
        if quote:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)


class PostgresConnection:
    """A psycopg connection seen through the warehouse interface (``connection.WarehouseConnection``)."""

    dialect = "postgresql"

    def __init__(self, conn: psycopg.Connection):
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> psycopg.Cursor:
        return self._conn.execute(to_pyformat(sql), list(params) if params else [])

    def delete(self, sql: str, params: Sequence[Any] | None = None) -> int:
        return self.execute(sql, params).rowcount

    def insert(self, table: str, columns: dict[str, Any]) -> int:
        batch = pa.table(columns)
        if batch.num_rows == 0:
            return 0
        values = [batch.column(name).to_pylist() for name in batch.column_names]
        with self._conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(batch.column_names)}) FROM STDIN") as copy:
            for row in zip(*values):
                copy.write_row(row)
        return batch.num_rows

    def fetch_arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        cur = self.execute(sql, params)
        names = [column.name for column in cur.description]
        rows = cur.fetchall()
        return pa.table({name: pa.array([row[i] for row in rows]) for i, name in enumerate(names)})

    def write_parquet(self, sql: str, params: Sequence[Any] | None, path: Path, *, schema: pa.Schema, row_group_size: int) -> None:
        # A server-side cursor: the result streams in row groups, never whole in memory.
        with self._conn.cursor(name="parquet_export") as cur, pq.ParquetWriter(str(path), schema) as writer:
            cur.itersize = row_group_size
            cur.execute(to_pyformat(sql), list(params) if params else [])
            while rows := cur.fetchmany(row_group_size):
                arrays = [pa.array([row[i] for row in rows], type=field.type) for i, field in enumerate(schema)]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema), row_group_size=row_group_size)

    def scratch_table(self, name: str, columns: dict[str, Any], types: dict[str, str]):
        return scratch_table_by_sql(self, name, columns, types)

    def invalid_vector(self, column: str) -> str:
        # NaN and infinities make the sum NaN, which fails the norm test (NaN compares greater than any number).
        return f"""({column} IS NULL OR coalesce(array_length({column}, 1), 0) <> ?
            OR NOT coalesce(abs((SELECT sum(x::float8 * x::float8) FROM unnest({column}) AS u(x)) - 1) < ?, false))"""

    def row_hash(self, *expressions: str) -> str:
        return f"hashtextextended(concat_ws('|', {', '.join(expressions)}), 0)"


def _open(url: str, *, autocommit: bool) -> psycopg.Connection:
    try:
        return psycopg.connect(_libpq_url(url), autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_SECONDS)
    except psycopg.OperationalError as exc:
        raise WarehouseError(
            f"cannot connect to the PostgreSQL warehouse {mask_url(url)}: {_first_line(exc)}: check "
            "EMBEDDING_WAREHOUSE_URL (host, port, database, user, password) and that the server is running"
        ) from None


def _libpq_url(url: str) -> str:
    """libpq does not know SQLAlchemy's ``postgresql+psycopg://`` spelling."""
    return "postgresql://" + url.split("://", 1)[1] if url.startswith("postgresql+") else url


@contextlib.contextmanager
def connect(url: str, *, read_only: bool, lock_timeout_seconds: float) -> Iterator[PostgresConnection]:
    """One unit of work in one transaction: committed when the block ends, rolled back when it raises."""
    if (url, os.getpid()) not in _SCHEMA_READY:
        if read_only:
            with connect(url, read_only=False, lock_timeout_seconds=lock_timeout_seconds):  # creates or migrates it
                pass
        else:
            _SCHEMA_READY.add((url, os.getpid()))
            try:
                with connect(url, read_only=False, lock_timeout_seconds=lock_timeout_seconds) as con:
                    _require_byte_order(con, url)
                    ensure_schema(con)
            except SchemaMismatch as exc:
                _SCHEMA_READY.discard((url, os.getpid()))
                raise WarehouseError(
                    f"the PostgreSQL warehouse {mask_url(url)} has schema version {exc.found!r}, this release reads "
                    f"{SCHEMA_VERSION}: point EMBEDDING_WAREHOUSE_URL at another database, or drop its tables and run "
                    "`embedding-pipeline materialize` to rebuild them from the source folders"
                ) from None
            except BaseException:
                _SCHEMA_READY.discard((url, os.getpid()))
                raise
    conn = _open(url, autocommit=False)
    try:
        try:
            if read_only:
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                conn.read_only = True
            else:
                conn.execute(f"SET LOCAL lock_timeout = {_millis(lock_timeout_seconds)}")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock_key(WAREHOUSE_LOCK)])
        except psycopg.errors.LockNotAvailable:
            raise WarehouseError(
                f"timed out after {lock_timeout_seconds:g} s waiting for the writer lock of the PostgreSQL warehouse "
                f"{mask_url(url)}: another run is using the warehouse; retry later or raise lock_timeout_seconds "
                "(EMBEDDING_LOCK_TIMEOUT_SECONDS)"
            ) from None
        except psycopg.OperationalError as exc:
            raise _lost(url, exc) from None
        try:
            yield PostgresConnection(conn)
        except BaseException as exc:
            _rollback(conn)
            if isinstance(exc, psycopg.OperationalError):
                raise _lost(url, exc) from exc
            raise
        try:
            conn.commit()
        except psycopg.OperationalError as exc:
            raise _lost(url, exc) from exc
    finally:
        conn.close()


@contextlib.contextmanager
def advisory_lock(url: str, name: str, *, timeout: float) -> Iterator[None]:
    """Hold the session-level advisory lock ``name`` on the server for the block (one holder across machines).

    Raises LockTimeout after ``timeout`` seconds. The server releases it when the block ends, or when the
    holder's connection drops (a killed worker does not leave it held).
    """
    conn = _open(url, autocommit=True)
    try:
        conn.execute(f"SET lock_timeout = {_millis(timeout)}")
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", [lock_key(name)])
        except psycopg.errors.LockNotAvailable:
            raise LockTimeout(
                f"timed out after {timeout:.0f} s waiting for the PostgreSQL advisory lock {name!r} on {mask_url(url)}"
            ) from None
        yield
    finally:
        conn.close()  # ends the session: the lock goes with it


def _require_byte_order(con: PostgresConnection, url: str) -> None:
    """Text must sort byte-wise, as in DuckDB: the first chunk of a text in that order stays canonical, so
    another collation would make other dedup decisions (other vector ids) than the embedded warehouse."""
    collation = con.execute("SELECT datcollate FROM pg_database WHERE datname = current_database()").fetchone()[0]
    if collation not in ("C", "POSIX", "C.UTF-8", "C.utf8"):
        raise WarehouseError(
            f"the PostgreSQL warehouse {mask_url(url)} sorts text by the collation {collation!r}; the warehouse needs "
            "byte order: create its database with CREATE DATABASE ... TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C' "
            "(docs/scaling.md)"
        )


def _millis(seconds: float) -> int:
    return max(1, int(seconds * 1000))  # 0 would mean "wait forever"


def _lost(url: str, exc: BaseException) -> WarehouseError:
    if isinstance(exc, psycopg.errors.DiskFull):
        detail = "the server's disk is full: free space on the PostgreSQL server"
    else:
        detail = "the connection was lost or the server refused the work (restarted, shut down, out of resources)"
    return WarehouseError(
        f"PostgreSQL warehouse {mask_url(url)}: {detail} ({_first_line(exc)}); the unit of work was rolled back and "
        "nothing of it was stored: run again once the server answers"
    )


def _rollback(conn: psycopg.Connection) -> None:
    try:
        conn.rollback()
    except psycopg.Error:  # the connection is gone: the server rolled it back already
        pass


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
