"""The embedded backend: one DuckDB file under the home, behind an OS file lock.

DuckDB allows one writing process per file (dagster #16248: "Could not set lock on file"), and
partitions run in separate processes. So every unit of work takes an OS file lock next to the
database (exclusive to write, shared to read), attaches the file to DuckDB for its duration and
detaches it again, which releases DuckDB's own lock on the file for the next process.
Steps hold the lock only while they read their inputs or write a batch, never while they compute embeddings.

Starting a DuckDB instance costs ~20 ms even for ``:memory:`` (an unchanged re-run opens the warehouse
dozens of times), attaching a file to a running one ~2 ms. So each process keeps one in-memory DuckDB
*host* per warehouse file and every unit of work attaches the file to it (``ATTACH ... AS alias``) on a
cursor of its own. Invariants of the host (``_Host``):

- a file is attached only inside a unit of work, under our flock, and detached before the flock is
  released: between units no DuckDB lock is held, exactly as when each unit opened and closed DuckDB;
- concurrent readers of one process (the service reads from threads) share one read-only attachment
  (flock shares readers and excludes writers, so it sees what each reader would see alone), since
  two attachments of one file would be two file descriptors, and closing either drops the POSIX lock
  DuckDB holds through the other; a writer attaches alone (its flock excludes everyone else);
- a host is never used in a process other than the one that created it (recreated after ``fork``);
- after any DuckDB error in a unit of work the host is discarded (closed once its last user is done)
  and the next unit starts a fresh one, so a fatal storage error cannot poison later units.

Programs outside the pipeline (a ``duckdb`` shell, a notebook) take DuckDB's own file lock, not
ours. ``connect`` then retries with backoff instead of failing at once, within the same
``lock_timeout_seconds`` bound, and only then raises WarehouseError naming the file, the program
DuckDB reports as the holder, and what to do (README: "Reading the warehouse safely").
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from resources.locks import LockTimeout, file_lock
from resources.warehouse.errors import WarehouseError
from resources.warehouse.schema import SCHEMA_VERSION, SchemaMismatch, ensure_schema

log = logging.getLogger("embedding_pipeline.warehouse")

# DuckDB's message when another process holds the file, e.g. 'Could not set lock on file "...":
# Conflicting lock is held in /usr/bin/duckdb (PID 4242)'.
_DUCKDB_LOCK_ERROR = "Could not set lock on file"
_DUCKDB_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")


class DuckDBConnection:
    """A DuckDB connection seen through the warehouse interface (``connection.WarehouseConnection``).

    Anything else is passed through to the DuckDB connection (DuckDB-only tests use ``register``).
    """

    dialect = "duckdb"

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con

    def __getattr__(self, name: str):
        return getattr(self._con, name)

    def execute(self, sql: str, params: Sequence[Any] | None = None):
        return self._con.execute(sql, list(params) if params else [])

    def delete(self, sql: str, params: Sequence[Any] | None = None) -> int:
        return int(self._con.execute(sql, list(params) if params else []).fetchone()[0])  # DuckDB answers with the count

    def insert(self, table: str, columns: dict[str, Any]) -> int:
        batch = pa.table(columns)
        if batch.num_rows == 0:
            return 0
        self._con.register("_insert_batch", batch)
        with self._unregistered("_insert_batch"):
            names = ", ".join(batch.column_names)
            self._con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM _insert_batch")  # noqa: S608 - table and column names come from the caller's constant schema, never from input
        return batch.num_rows

    def fetch_arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        return self._con.sql(sql, params=list(params) if params else None).to_arrow_table()

    def write_parquet(self, sql: str, params: Sequence[Any] | None, path: Path, *, schema: pa.Schema, row_group_size: int) -> None:
        self._con.sql(sql, params=list(params) if params else None).write_parquet(str(path), row_group_size=row_group_size)

    @contextlib.contextmanager
    def scratch_table(self, name: str, columns: dict[str, Any], types: dict[str, str]) -> Iterator[None]:
        self._con.register(name, pa.table(columns))  # an Arrow scan: nothing copied
        with self._unregistered(name):
            yield

    @contextlib.contextmanager
    def _unregistered(self, name: str) -> Iterator[None]:
        """Unregister the Arrow view ``name`` after the block. When the block failed, DuckDB may refuse
        (an aborted transaction, e.g. after a full disk); that refusal must not hide the error that
        matters, and the view ends with the unit of work's cursor anyway."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self._con.unregister(name)
            raise
        self._con.unregister(name)

    def invalid_vector(self, column: str) -> str:
        return f"""({column} IS NULL OR len({column}) <> ?
            OR NOT coalesce(list_bool_and(list_transform({column}, lambda x: isfinite(x))), false)
            OR NOT coalesce(abs(list_dot_product({column}, {column}) - 1) < ?, false))"""

    def row_hash(self, *expressions: str) -> str:
        return f"hash({', '.join(expressions)})"


@contextlib.contextmanager
def connect(path: Path, *, read_only: bool, lock_timeout_seconds: float) -> Iterator[DuckDBConnection]:
    """One short unit of work: lock, attach, yield a connection, commit or roll back, detach, unlock.

    Writers are serialized across processes and threads; readers share the lock (and, in one process,
    the attachment) with each other. When this returns, another process can open the file at once.
    A unit of work that raises is rolled back, so nothing already stored is lost.

    Storage failures become WarehouseError with a message naming the file and what to do: a
    damaged file (garbage, truncated, empty, a folder in its place, another schema version), a full
    disk, a read-only or unreadable home. DuckDB errors of the query itself (a bug) are raised as they are.
    """
    home = path.parent
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WarehouseError(
            f"cannot create the home folder {home} (EMBEDDING_HOME): {exc.strerror or exc}: "
            f"{_remedy_for_os_error(exc, home)}"
        ) from exc
    if read_only and not path.exists():
        with connect(path, read_only=False, lock_timeout_seconds=lock_timeout_seconds):  # first use: the schema
            pass
    deadline = time.monotonic() + lock_timeout_seconds  # one bound for both locks
    with _lock(home, exclusive=not read_only, timeout=lock_timeout_seconds), _hosted(path) as host:
        con, alias = _attach(host, path, read_only, deadline, lock_timeout_seconds)
        try:
            if read_only:
                try:
                    yield DuckDBConnection(con)
                except duckdb.Error as exc:
                    host.discard()
                    raise _storage_failure(path, exc) or exc
                return
            try:
                _ensure_schema(DuckDBConnection(con), path)
                con.execute("BEGIN TRANSACTION")
            except duckdb.Error as exc:
                host.discard()
                raise _storage_failure(path, exc) or exc
            try:
                yield DuckDBConnection(con)
            except BaseException as exc:
                _rollback(con)
                if isinstance(exc, duckdb.Error):
                    host.discard()
                    raise _storage_failure(path, exc) or exc
                raise
            try:
                con.execute("COMMIT")
            except duckdb.Error as exc:  # a failed COMMIT has already ended the transaction
                host.discard()
                raise _storage_failure(path, exc) or exc
        finally:
            _detach(host, con, alias, read_only)


def _ensure_schema(con: DuckDBConnection, path: Path) -> None:
    try:
        ensure_schema(con)
    except SchemaMismatch as exc:
        raise WarehouseError(
            f"the warehouse {path} has schema version {exc.found!r}, this release reads {SCHEMA_VERSION}: "
            f"{_MOVE_ASIDE}; or use another EMBEDDING_HOME"
        ) from None


def _storage_failure(path: Path, exc: duckdb.Error) -> WarehouseError | None:
    """WarehouseError naming the file and what to do when ``exc`` is a storage failure, else None."""
    message = _storage_message(path, str(exc))
    if message is None:
        return None
    failure = WarehouseError(message)
    failure.__cause__ = exc
    return failure


class _Host:
    """One in-memory DuckDB instance of this process that units of work attach one warehouse file to.

    ``users`` counts the units of work inside it; ``reader_alias``/``readers`` the read-only attachment
    that concurrent readers share. Both change only under ``lock``. A discarded host takes no new
    units and is closed by its last user.
    """

    def __init__(self, path: Path):
        # Spills go next to the file, where DuckDB puts them for a database opened by path.
        self.con = duckdb.connect(":memory:", config={"temp_directory": f"{path}.tmp"})
        self.lock = threading.Lock()
        self.users = 0
        self.reader_alias: str | None = None
        self.readers = 0
        self.discarded = False

    def discard(self) -> None:
        """Take no new units of work (the next one starts a fresh host); close when the last user is done."""
        with _hosts_lock:
            self.discarded = True
            for key, host in list(_hosts.items()):
                if host is self:
                    del _hosts[key]


_hosts: dict[str, _Host] = {}  # warehouse file (real path) -> its host in this process
_hosts_lock = threading.Lock()
_hosts_pid = os.getpid()
_forked_away: list[_Host] = []  # the parent's hosts, never used nor closed in a child (their threads are not here)
_aliases = itertools.count(1)
_IDLE_HOSTS = 4  # hosts of other files kept open (tests use many homes; a pipeline process uses one)


def _forget_hosts_after_fork() -> None:
    global _hosts, _hosts_lock, _hosts_pid
    _forked_away.extend(_hosts.values())
    _hosts, _hosts_lock, _hosts_pid = {}, threading.Lock(), os.getpid()


os.register_at_fork(after_in_child=_forget_hosts_after_fork)


@contextlib.contextmanager
def _hosted(path: Path) -> Iterator[_Host]:
    """This process's host for ``path`` for one unit of work (created on first use, after a fork, or
    after the previous one was discarded); closed at the end if it was discarded meanwhile."""
    if _hosts_pid != os.getpid():  # a fork that bypassed os.fork's hooks
        _forget_hosts_after_fork()
    key = os.path.realpath(path)
    with _hosts_lock:
        host = _hosts.get(key)
        if host is None:
            host = _hosts[key] = _Host(path)
        host.users += 1
    try:
        yield host
    finally:
        with _hosts_lock:
            host.users -= 1
            idle = [h for h in _hosts.values() if h.users == 0 and h is not host]
            closing = idle[: max(0, len(_hosts) - _IDLE_HOSTS)]
            for h in closing:
                h.discarded = True
                del _hosts[next(k for k, v in _hosts.items() if v is h)]
            if host.discarded and host.users == 0:
                closing.append(host)
        for h in closing:
            _close(h.con)


def _attach(
    host: _Host, path: Path, read_only: bool, deadline: float, lock_timeout_seconds: float
) -> tuple[duckdb.DuckDBPyConnection, str]:
    """A cursor of ``host`` with ``path`` attached and in use, and the attachment's alias.

    Readers join the host's shared read-only attachment when there is one. While another program
    holds DuckDB's lock on the file, waits with backoff (until ``deadline``): pipeline processes never
    get here at the same time as a writer (our flock orders them), so a DuckDB lock conflict means a
    program outside the pipeline has the file open.
    """
    delay, warned = 0.05, False
    while True:
        try:
            with host.lock:
                if read_only and host.reader_alias is not None:
                    alias = host.reader_alias
                else:
                    alias = f"warehouse_{next(_aliases)}"
                    quoted = str(path).replace("'", "''")
                    host.con.execute(f"ATTACH '{quoted}' AS {alias} (TYPE duckdb, {'READ_ONLY' if read_only else 'READ_WRITE'})")
                    if read_only:
                        host.reader_alias = alias
                if read_only:
                    host.readers += 1
            break
        except duckdb.Error as exc:
            if _DUCKDB_LOCK_ERROR not in str(exc):
                host.discard()
                raise WarehouseError(
                    _storage_message(path, str(exc)) or f"cannot open the warehouse {path}: {exc}"
                ) from exc
            holder = _lock_holder(str(exc))
            now = time.monotonic()
            if now >= deadline:
                raise WarehouseError(
                    f"the warehouse {path} is held open by {holder}, which did not close it within "
                    f"lock_timeout_seconds={lock_timeout_seconds:g}: "
                    "close that program (a duckdb shell or notebook with the file open), or read an export or "
                    "a copy instead (README: Reading the warehouse safely); lock_timeout_seconds "
                    "(EMBEDDING_LOCK_TIMEOUT_SECONDS) sets how long runs wait"
                ) from None
            if not warned:
                warned = True
                log.warning(
                    "the warehouse %s is held open by %s; waiting up to %.0f s for it to close",
                    path, holder, deadline - now,
                )
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, 1.0)
    try:
        con = host.con.cursor()
        con.execute(f"USE {alias}")
    except duckdb.Error as exc:
        host.discard()
        _detach(host, None, alias, read_only)
        raise WarehouseError(_storage_message(path, str(exc)) or f"cannot open the warehouse {path}: {exc}") from exc
    return con, alias


def _detach(host: _Host, con: duckdb.DuckDBPyConnection | None, alias: str, read_only: bool) -> None:
    """End a unit of work: close its cursor (ending whatever results the caller kept), then detach the
    file (a read-write attachment checkpoints its WAL into the file first) unless other readers still
    share it. DuckDB's lock on the file is released when this returns."""
    if con is not None:
        _close(con)
    with host.lock:
        if read_only:
            host.readers -= 1
            if host.readers > 0:
                return
            host.reader_alias = None
        try:
            host.con.execute(f"DETACH {alias}")
        except duckdb.Error as exc:  # after a fatal storage error; the error that matters is already raised
            log.warning("closing the warehouse connection failed: %s", exc)
            host.discard()  # its last user closes it, and with it the file


@contextlib.contextmanager
def _lock(home: Path, *, exclusive: bool, timeout: float) -> Iterator[None]:
    try:
        with file_lock(home / "warehouse.lock", exclusive=exclusive, timeout=timeout):
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
