"""DuckDB warehouse: the one owner of the database file, its schema and every query.

DuckDB allows one writing process per file (dagster #16248: "Could not set lock on file"), and
partitions run in separate processes. So every access goes through :meth:`WarehouseResource.connect`,
which takes an OS file lock next to the database (exclusive to write, shared to read), opens DuckDB for
the duration of one short unit of work and closes it again. Steps hold the lock only while they read
their inputs or write a batch, never while they compute embeddings.

Programs outside the pipeline (a ``duckdb`` shell, a notebook) take DuckDB's own file lock, not
ours. ``connect`` then retries with backoff instead of failing at once, within the same
``lock_timeout_seconds`` bound, and only then raises WarehouseError naming the file, the program
DuckDB reports as the holder, and what to do (README: "Reading the warehouse safely").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field

from resources.locks import LockTimeout, file_lock

SCHEMA_VERSION = 3
# Migrations from an older schema version, in order: {from version: statements}.
_MIGRATIONS = {
    1: ["ALTER TABLE chunks ADD COLUMN IF NOT EXISTS page INTEGER"],  # PDF pages (formats registry)
    # Contextual chunks: what the model reads besides the text, and its hash (the chunker's version
    # changed with them, so every document is chunked again and the columns are filled).
    2: ["ALTER TABLE chunks ADD COLUMN IF NOT EXISTS context VARCHAR",
        "ALTER TABLE chunks ADD COLUMN IF NOT EXISTS embed_sha256 VARCHAR"],
}

log = logging.getLogger("embedding_pipeline.warehouse")

# DuckDB's message when another process holds the file, e.g. 'Could not set lock on file "...":
# Conflicting lock is held in /usr/bin/duckdb (PID 4242)'.
_DUCKDB_LOCK_ERROR = "Could not set lock on file"
_DUCKDB_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key VARCHAR, value VARCHAR)""",
    # raw_documents: one row per live file of a source; content kept so later stages never re-read disk.
    """CREATE TABLE IF NOT EXISTS documents (
        doc_id VARCHAR, source VARCHAR, relative_path VARCHAR, suffix VARCHAR,
        content_sha256 VARCHAR, size_bytes BIGINT, mtime_ns BIGINT, content BLOB,
        first_seen TIMESTAMP, updated_at TIMESTAMP)""",
    # Files of a source that were refused or skipped at read time, replaced on each scan of that source.
    """CREATE TABLE IF NOT EXISTS skipped_files (
        source VARCHAR, relative_path VARCHAR, reason VARCHAR, recorded_at TIMESTAMP)""",
    # Documents that could not be cleaned (binary, no text...). Replaced per document on each clean.
    """CREATE TABLE IF NOT EXISTS quarantine (
        doc_id VARCHAR, source VARCHAR, relative_path VARCHAR, stage VARCHAR, reason VARCHAR,
        content_sha256 VARCHAR, recorded_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS cleaned_documents (
        doc_id VARCHAR, source VARCHAR, content_sha256 VARCHAR, cleaning_fingerprint VARCHAR,
        cleaned_sha256 VARCHAR, text VARCHAR, blocks VARCHAR, title VARCHAR, language VARCHAR,
        warnings VARCHAR, char_count BIGINT)""",
    # Which cleaned version of a document its chunks were made from, under which chunking settings.
    """CREATE TABLE IF NOT EXISTS chunked_documents (
        doc_id VARCHAR, source VARCHAR, cleaned_sha256 VARCHAR, chunking_fingerprint VARCHAR,
        chunk_count INTEGER)""",
    """CREATE TABLE IF NOT EXISTS chunks (
        chunk_id VARCHAR, vector_id BIGINT, doc_id VARCHAR, source VARCHAR, ordinal INTEGER,
        text VARCHAR, text_sha256 VARCHAR, start_char INTEGER, end_char INTEGER,
        heading_path VARCHAR, token_count INTEGER, page INTEGER, context VARCHAR, embed_sha256 VARCHAR)""",
    # Dedup decision per live chunk: canonical, or a duplicate of another live chunk.
    """CREATE TABLE IF NOT EXISTS chunk_dedup (
        chunk_id VARCHAR, source VARCHAR, text_sha256 VARCHAR, status VARCHAR,
        duplicate_of VARCHAR, similarity DOUBLE, dedup_fingerprint VARCHAR, decided_in VARCHAR)""",
    # MinHash LSH band keys of canonical chunks: near-dup candidates across the whole corpus by a join.
    """CREATE TABLE IF NOT EXISTS minhash_bands (chunk_id VARCHAR, band INTEGER, band_key BIGINT)""",
    """CREATE TABLE IF NOT EXISTS minhash_signatures (chunk_id VARCHAR, signature BLOB)""",
    """CREATE TABLE IF NOT EXISTS embeddings (
        chunk_id VARCHAR, vector_id BIGINT, source VARCHAR, text_sha256 VARCHAR,
        model_fingerprint VARCHAR, vector FLOAT[])""",
    """CREATE TABLE IF NOT EXISTS quantization_ranges (
        model_fingerprint VARCHAR, ranges BLOB, dim INTEGER, sample_size INTEGER, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS quantized_embeddings (
        chunk_id VARCHAR, vector_id BIGINT, source VARCHAR, model_fingerprint VARCHAR,
        int8 BLOB, ubinary BLOB)""",
    "CREATE INDEX IF NOT EXISTS documents_source ON documents (source)",
    "CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (doc_id)",
    "CREATE INDEX IF NOT EXISTS chunks_source ON chunks (source)",
    "CREATE INDEX IF NOT EXISTS dedup_chunk ON chunk_dedup (chunk_id)",
    "CREATE INDEX IF NOT EXISTS dedup_text ON chunk_dedup (text_sha256)",
    "CREATE INDEX IF NOT EXISTS bands_key ON minhash_bands (band_key)",
    "CREATE INDEX IF NOT EXISTS embeddings_chunk ON embeddings (chunk_id)",
]


class WarehouseError(RuntimeError):
    """The warehouse cannot be opened or locked; the message names the file and what to do."""


class WarehouseResource(ConfigurableResource):
    """DuckDB warehouse under the pipeline home folder, safe to use from many processes at once."""

    home: str = Field(description="Pipeline home folder; the database is `{home}/warehouse.duckdb`.")
    lock_timeout_seconds: float = Field(
        default=900.0,
        description="How long a step waits for another process's write to finish before failing.",
    )

    @property
    def path(self) -> Path:
        return Path(self.home) / "warehouse.duckdb"

    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """One short unit of work: lock, open, yield a connection, commit or roll back, close, unlock.

        Writers are serialized across processes; readers share the lock with each other.
        A unit of work that raises is rolled back, so nothing already stored is lost.

        Storage failures become WarehouseError with a message naming the file and what to do: a
        damaged file (garbage, truncated, empty, a folder in its place, another schema version), a full
        disk, a read-only or unreadable home. DuckDB errors of the query itself (a bug) are raised as they are.
        """
        home = Path(self.home)
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WarehouseError(
                f"cannot create the home folder {home} (EMBEDDING_HOME): {exc.strerror or exc}: "
                f"{_remedy_for_os_error(exc, home)}"
            ) from exc
        if read_only and not self.path.exists():
            with self.connect():  # first use: create the schema under the write lock
                pass
        deadline = time.monotonic() + self.lock_timeout_seconds  # one bound for both locks
        with self._lock(home, exclusive=not read_only):
            con = self._open(read_only, deadline)
            try:
                if read_only:
                    try:
                        yield con
                    except duckdb.Error as exc:
                        raise self._storage_failure(exc) or exc
                    return
                try:
                    _ensure_schema(con, self.path)
                    con.execute("BEGIN TRANSACTION")
                except duckdb.Error as exc:
                    raise self._storage_failure(exc) or exc
                try:
                    yield con
                except BaseException as exc:
                    _rollback(con)
                    if isinstance(exc, duckdb.Error):
                        raise self._storage_failure(exc) or exc
                    raise
                try:
                    con.execute("COMMIT")
                except duckdb.Error as exc:  # a failed COMMIT has already ended the transaction
                    raise self._storage_failure(exc) or exc
            finally:
                _close(con)

    def _storage_failure(self, exc: duckdb.Error) -> WarehouseError | None:
        """WarehouseError naming the file and what to do when ``exc`` is a storage failure, else None."""
        message = _storage_message(self.path, str(exc))
        if message is None:
            return None
        failure = WarehouseError(message)
        failure.__cause__ = exc
        return failure

    def _open(self, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        """Open DuckDB, waiting with backoff (until ``deadline``) while another program holds its file lock.

        Pipeline processes never get here at the same time as a writer (our flock orders them), so
        a DuckDB lock conflict means a program outside the pipeline has the file open.
        """
        delay, warned = 0.05, False
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if _DUCKDB_LOCK_ERROR not in str(exc):
                    raise WarehouseError(
                        _storage_message(self.path, str(exc)) or f"cannot open the warehouse {self.path}: {exc}"
                    ) from exc
                holder = _lock_holder(str(exc))
                now = time.monotonic()
                if now >= deadline:
                    raise WarehouseError(
                        f"the warehouse {self.path} is held open by {holder}, which did not close it within "
                        f"lock_timeout_seconds={self.lock_timeout_seconds:g}: "
                        "close that program (a duckdb shell or notebook with the file open), or read an export or "
                        "a copy instead (README: Reading the warehouse safely); lock_timeout_seconds "
                        "(EMBEDDING_LOCK_TIMEOUT_SECONDS) sets how long runs wait"
                    ) from None
                if not warned:
                    warned = True
                    log.warning(
                        "the warehouse %s is held open by %s; waiting up to %.0f s for it to close",
                        self.path, holder, deadline - now,
                    )
                time.sleep(min(delay, max(deadline - now, 0.0)))
                delay = min(delay * 2, 1.0)

    @contextlib.contextmanager
    def _lock(self, home: Path, *, exclusive: bool) -> Iterator[None]:
        try:
            with file_lock(home / "warehouse.lock", exclusive=exclusive, timeout=self.lock_timeout_seconds):
                yield
        except LockTimeout as exc:
            raise WarehouseError(
                f"{exc}: another run is using the warehouse; retry later or raise lock_timeout_seconds "
                "(EMBEDDING_LOCK_TIMEOUT_SECONDS)"
            ) from None
        except OSError as exc:  # the lock file cannot be created: full disk, read-only or unwritable home
            raise WarehouseError(
                f"cannot create the lock file {home / 'warehouse.lock'}: {exc.strerror or exc}: "
                f"{_remedy_for_os_error(exc, home)}"
            ) from exc

    def query_rows(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        """Run a read query and return all rows (small results only)."""
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).fetchall()

    def stream_arrow(self, sql: str, params: list[Any] | None = None, batch_rows: int = 4096) -> Iterator[pa.RecordBatch]:
        """Stream a query's result as Arrow record batches, holding the read lock while iterating.

        Keep the loop body short (no model calls): writers wait for it.
        """
        with self.connect(read_only=True) as con:
            reader = con.sql(sql, params=params or None).to_arrow_reader(batch_rows)
            yield from reader


# Substrings of DuckDB's messages for a file that is not a sound DuckDB database of this release.
_DAMAGE_SIGNS = (
    "not a valid DuckDB database", "Could not read enough bytes", "Corrupt", "checksum", "version number",
    "Serialization Error", "INTERNAL Error", "database has been invalidated", "Is a directory",
)
# The file DuckDB failed to write, e.g. 'Could not write file "/home/x/warehouse.duckdb.wal": No space left'
# (inside a JSON payload for async writes the quotes are escaped).
_WRITTEN_FILE = re.compile(r'Could not write file \\?"(.+?)\\?"')
_MOVE_ASIDE = (
    "move it aside (with its .wal file, if any) and run `embedding-pipeline materialize` to rebuild it from "
    "the source folders (cached embeddings are reused), or restore a copy; searches keep answering from the "
    "published index meanwhile"
)


def _storage_message(path: Path, detail: str) -> str | None:
    """What to tell a person about DuckDB's ``detail`` for the warehouse ``path``, when it is a storage failure.

    Returns None for anything else (a query error is a bug, not a state to repair).
    """
    detail = detail.strip()
    if "No space left on device" in detail or "disk is full" in detail:
        named = _WRITTEN_FILE.search(detail)
        written = Path(named.group(1)) if named else path
        return (
            f"no space left on device writing {written} (the disk holding {written.parent} is full): free "
            "space there, or move EMBEDDING_HOME to a larger disk, and run again; the failed write was rolled "
            f"back and nothing stored was lost ({detail})"
        )
    if "Permission denied" in detail:
        return (
            f"permission denied on the warehouse {path} or its folder: give the pipeline's user read and write "
            f"permission on both ({detail})"
        )
    if "Read-only file system" in detail:
        return f"the warehouse {path} is on a read-only file system: remount it read-write or move EMBEDDING_HOME ({detail})"
    if any(sign in detail for sign in _DAMAGE_SIGNS):
        what = "is a folder, not a database file" if "Is a directory" in detail else "is damaged or not a DuckDB 2.0 database"
        return f"the warehouse {path} {what} ({detail}): {_MOVE_ASIDE}"
    return None


def _remedy_for_os_error(exc: OSError, home: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device: free space there or move EMBEDDING_HOME to a larger disk; nothing stored was lost"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"give the pipeline's user write permission on {home}"
    if exc.errno == errno.EROFS:
        return "remount it read-write or move EMBEDDING_HOME"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "EMBEDDING_HOME must name a folder: move the file there aside or point EMBEDDING_HOME elsewhere"
    return "check EMBEDDING_HOME"


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back after a failed unit of work; a transaction DuckDB already ended (failed COMMIT, fatal
    error) needs none, and that second error must not hide the first."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass


def _close(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.close()
    except duckdb.Error as exc:  # after a fatal storage error; the error that matters is already raised
        log.warning("closing the warehouse connection failed: %s", exc)


def _lock_holder(message: str) -> str:
    """The program DuckDB names as holding the file (``process 4242 (/usr/bin/duckdb)``), when it names one."""
    match = _DUCKDB_LOCK_HOLDER.search(message)
    return f"process {match.group(2)} ({match.group(1)})" if match else "another program"


def deleted_rows(con: duckdb.DuckDBPyConnection, delete_sql: str, params: list[Any] | None = None) -> int:
    """Run a DELETE and return how many rows it removed (DuckDB answers a DELETE with its count)."""
    return int(con.execute(delete_sql, params or []).fetchone()[0])


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, columns: dict[str, Any]) -> int:
    """Insert columns (name -> list / numpy / arrow array) into ``table`` in one statement."""
    batch = pa.table(columns)
    if batch.num_rows == 0:
        return 0
    con.register("_insert_batch", batch)
    try:
        names = ", ".join(batch.column_names)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _insert_batch")
    finally:
        con.unregister("_insert_batch")
    return batch.num_rows


def replace_quarantine(
    con: duckdb.DuckDBPyConnection, stage: str, source: str, doc_ids: list[str], failures: list[tuple[str, str, str, str]]
) -> None:
    """Replace ``stage``'s quarantine records of ``doc_ids`` with ``failures``:
    (doc_id, relative_path, reason, content_sha256) each, recorded now."""
    con.execute("DELETE FROM quarantine WHERE stage = ? AND doc_id IN (SELECT unnest(?::VARCHAR[]))", [stage, list(doc_ids)])
    now = datetime.now(timezone.utc)
    insert_arrow(con, "quarantine", {
        "doc_id": [f[0] for f in failures], "source": [source] * len(failures),
        "relative_path": [f[1] for f in failures], "stage": [stage] * len(failures),
        "reason": [f[2] for f in failures], "content_sha256": [f[3] for f in failures],
        "recorded_at": [now] * len(failures),
    })


def vectors_to_arrow(vectors: np.ndarray) -> pa.Array:
    """(n, dim) float32 -> Arrow list<float> column for DuckDB FLOAT[]."""
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


def _ensure_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    if con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
    ).fetchone()[0]:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row and row[0] == str(SCHEMA_VERSION):
            return
        found = int(row[0]) if row and str(row[0]).isdigit() else None
        if found is not None and found in _MIGRATIONS and found < SCHEMA_VERSION:
            for version in range(found, SCHEMA_VERSION):
                for statement in _MIGRATIONS[version]:
                    con.execute(statement)
            for statement in _SCHEMA:  # tables and indexes added since (all IF NOT EXISTS)
                con.execute(statement)
            con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            return
        if row:
            raise WarehouseError(
                f"the warehouse {path} has schema version {row[0]!r}, this release reads {SCHEMA_VERSION}: "
                f"{_MOVE_ASIDE}; or use another EMBEDDING_HOME"
            )
    for statement in _SCHEMA:
        con.execute(statement)
    con.execute("DELETE FROM meta WHERE key = 'schema_version'")
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
