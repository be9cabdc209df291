"""The local tier: one SQLite file shared by the processes of one machine.

``{home}/cache/embeddings.sqlite`` in WAL mode with a busy timeout, so several processes read and
write it safely; one connection per process, used under a lock.

The file is only a cache, so a damaged one is never fatal: when SQLite reports that it is not a
database or that its image is malformed (SQLITE_NOTADB, SQLITE_CORRUPT), the file and its ``-wal``
and ``-shm`` companions are moved aside as ``embeddings.sqlite.corrupt-<UTC time>-<pid>``, one
warning names both paths, and an empty database is created in its place; the call that found the
damage then sees misses (a read) or is written again (a write). Other errors (locked for longer
than the busy timeout, a read-only or full file system, a folder in the file's place) are not
damage and raise ``EmbeddingCacheStorageError``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from resources.cache.errors import EmbeddingCacheStorageError

logger = logging.getLogger("embedding_pipeline.cache")

_BUSY_TIMEOUT_MS = 10_000
_DAMAGE_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_COMPANIONS = ("", "-wal", "-shm", "-journal")

T = TypeVar("T")


def is_damage(exc: BaseException) -> bool:
    """True when a SQLite error means the file's bytes are damaged (not locked, not read-only)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and (code & 0xFF) in _DAMAGE_CODES


class DiskTier:
    """One SQLite file; damaged files are moved aside and recreated (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.moved_aside: list[Path] = []  # files this process moved aside (for reports and tests)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Stored values of the keys present; absent keys are left out."""

        def read(conn: sqlite3.Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            batch = max(1, min(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), 30_000))
            for start in range(0, len(keys), batch):
                part = list(keys[start : start + batch])
                placeholders = ",".join("?" * len(part))
                found.update(conn.execute(f"SELECT key, value FROM embeddings WHERE key IN ({placeholders})", part))  # noqa: S608 - only '?' placeholders are interpolated; keys are parameters
            return found

        return self._run("read", read, on_damage=dict)

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Write (key, value) pairs in one transaction; later pairs win."""

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT OR REPLACE INTO embeddings (key, value) VALUES (?, ?)", items)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        self._run("write", write, on_damage=None)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    # ----------------------------------------------------------------- internals

    def _run(self, what: str, operation: Callable[[sqlite3.Connection], T], on_damage) -> T:
        """Run ``operation`` on the connection; on damage move the file aside and go on once.

        ``on_damage`` None: run the operation again on the new file; else return ``on_damage()``.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    return operation(self._connection())
                except sqlite3.Error as exc:
                    if not is_damage(exc) or attempt == 2:
                        raise EmbeddingCacheStorageError(
                            f"cannot {what} the disk cache {self.path}: {exc}; check the file system, "
                            "or delete the file (it is only a cache)"
                        ) from exc
                    self._move_aside(exc)
                    if on_damage is not None:
                        return on_damage()
        raise AssertionError("unreachable")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddingCacheStorageError(f"cannot create the disk cache folder {self.path.parent}: {exc}") from exc
        for attempt in (1, 2):
            try:
                self._conn = self._open()
                return self._conn
            except sqlite3.Error as exc:
                self._close_locked()
                if not is_damage(exc) or attempt == 2:
                    raise EmbeddingCacheStorageError(
                        f"cannot open the disk cache {self.path}: {exc}; check the file system, "
                        "or delete the file (it is only a cache)"
                    ) from exc
                self._move_aside(exc)
        raise AssertionError("unreachable")

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # explicit BEGIN IMMEDIATE in set_many
            check_same_thread=False,  # guarded by self._lock
        )
        self._conn = conn
        self._inode = os.stat(self.path).st_ino  # connect created the file if it was missing
        # busy_timeout first, so that racing processes wait instead of failing below.
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")  # reads the header: a non-database fails here
        # NORMAL in WAL: a power cut may lose the last writes, which a cache can afford.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, value BLOB)")
        return conn

    def _close_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:  # closing a damaged database must not hide the damage itself
                pass

    def _move_aside(self, exc: BaseException) -> None:
        """Rename the damaged file (and companions) with a timestamp suffix, under a lock file.

        Another process may have found the same damage first: if the file at ``path`` is no longer
        the one this connection opened, it was already replaced and is left alone.
        """
        mine = self._inode
        self._close_locked()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = os.stat(self.path).st_ino if self.path.exists() else None
                if current is None or (mine is not None and current != mine):
                    return  # gone or already replaced by another process
                for suffix in _COMPANIONS:
                    source = Path(f"{self.path}{suffix}")
                    if source.exists():
                        os.replace(source, f"{target}{suffix}")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.moved_aside.append(target)
        logger.warning(
            "disk embedding cache %s is damaged (%s); moved it aside to %s and started an empty one "
            "(it is only a cache: vectors are re-embedded or read from other tiers)",
            self.path,
            exc,
            target,
        )
