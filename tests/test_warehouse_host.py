"""The DuckDB warehouse's per-process host: each unit of work attaches the file to one in-memory DuckDB
instance of the process and detaches it at the end (resources/warehouse/duckdb_backend.py).

What must hold as when every unit opened and closed DuckDB itself: another process opens the file
right after a unit (DuckDB's lock released, the data durable and visible), readers on threads run
at once, a storage failure or a fork never leaves a process with a host it cannot use.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pytest

from resources import WarehouseResource
from resources.warehouse import WarehouseError
from tests.disk_support import fill, mounted_tmpfs


def _warehouse(home: Path) -> WarehouseResource:
    return WarehouseResource(home=str(home), lock_timeout_seconds=20.0)


def _write(warehouse: WarehouseResource, key: str, value: str = "1") -> None:
    with warehouse.connect() as con:
        con.execute("INSERT INTO meta VALUES (?, ?)", [key, value])


def _keys(warehouse: WarehouseResource) -> set[str]:
    return {key for (key,) in warehouse.query_rows("SELECT key FROM meta WHERE key <> 'schema_version'")}


def _outside_process(path: Path, code: str) -> str:
    """Run ``code`` with ``con`` open read-write on ``path`` (DuckDB's exclusive lock) in another process."""
    script = f"import duckdb\ncon = duckdb.connect({str(path)!r})\n{code}\ncon.close()\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_another_process_opens_the_file_right_after_a_unit_and_sees_its_writes(tmp_path):
    warehouse = _warehouse(tmp_path / "home")
    _write(warehouse, "first")
    # Read-write in the other process: it gets DuckDB's exclusive lock only if ours is gone.
    seen = _outside_process(
        warehouse.path,
        "print(sorted(k for (k,) in con.execute('SELECT key FROM meta').fetchall()))\n"
        "con.execute(\"INSERT INTO meta VALUES ('outside', '2')\")",
    )
    assert "'first'" in seen
    assert _keys(warehouse) == {"first", "outside"}  # a read unit: its shared attachment is detached at the end
    assert _outside_process(warehouse.path, "print(con.execute('SELECT count(*) FROM meta').fetchone()[0])") == "3"
    _write(warehouse, "after")  # and this process attaches it again after the other one wrote
    assert _keys(warehouse) == {"first", "outside", "after"}


def test_reader_threads_run_at_once_beside_a_writer_and_release_the_file(tmp_path):
    warehouse = _warehouse(tmp_path / "home")
    _write(warehouse, "seed")
    readers = 4
    inside = threading.Barrier(readers, timeout=30)
    errors: list[BaseException] = []

    def read_together() -> None:
        try:
            with warehouse.connect(read_only=True) as con:
                before = con.execute("SELECT count(*) FROM meta").fetchone()[0]
                inside.wait()  # all readers inside their unit at once: readers of one process are not serialized
                assert con.execute("SELECT count(*) FROM meta").fetchone()[0] == before
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read_together) for _ in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors

    # Readers and a writer interleaved: every read sees whole units, every write lands.
    writes, reads_per_thread = 25, 25
    seen: list[int] = []

    def write_many() -> None:
        try:
            for i in range(writes):
                _write(warehouse, f"w{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def read_many() -> None:
        try:
            for _ in range(reads_per_thread):
                with warehouse.connect(read_only=True) as con:
                    keys = {k for (k,) in con.execute("SELECT key FROM meta WHERE key LIKE 'w%'").fetchall()}
                    seen.append(len(keys))
                    assert keys == {f"w{i}" for i in range(len(keys))}  # a prefix of the writes, never a gap
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write_many)] + [threading.Thread(target=read_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(seen) == 3 * reads_per_thread
    assert _keys(warehouse) == {"seed"} | {f"w{i}" for i in range(writes)}
    # Nothing of this process holds the file any more.
    assert _outside_process(
        warehouse.path, "print(con.execute(\"SELECT count(*) FROM meta WHERE key LIKE 'w%'\").fetchone()[0])"
    ) == str(writes)


def test_a_damaged_file_fails_clearly_and_the_repaired_file_works_in_the_same_process(tmp_path):
    warehouse = _warehouse(tmp_path / "home")
    _write(warehouse, "kept")
    good = warehouse.path.read_bytes()
    warehouse.path.write_bytes(b"not a database\n" * 1000)
    for read_only in (True, False):
        with pytest.raises(WarehouseError, match="is damaged or not a DuckDB 2.0 database"):
            with warehouse.connect(read_only=read_only):
                pass
    warehouse.path.write_bytes(good)  # restored from a copy
    assert _keys(warehouse) == {"kept"}
    _write(warehouse, "after")
    assert _keys(warehouse) == {"kept", "after"}


def test_a_query_error_is_raised_as_it_is_and_the_next_unit_works(tmp_path):
    warehouse = _warehouse(tmp_path / "home")
    _write(warehouse, "kept")
    with pytest.raises(duckdb.CatalogException):
        with warehouse.connect() as con:
            con.execute("INSERT INTO meta VALUES ('lost', '1')")
            con.execute("SELECT * FROM no_such_table")
    assert _keys(warehouse) == {"kept"}  # the failed unit was rolled back
    _write(warehouse, "after")
    assert _keys(warehouse) == {"kept", "after"}


def test_a_full_disk_mid_write_does_not_poison_later_units_of_the_process(tmp_path):
    with mounted_tmpfs(tmp_path / "mnt", "32m") as mount_point:
        warehouse = _warehouse(mount_point / "home")
        _write(warehouse, "kept")
        ballast = fill(mount_point)
        with pytest.raises(WarehouseError, match="no space left on device"):
            with warehouse.connect() as con:
                con.insert("meta", {"key": [f"big{i}" for i in range(200_000)], "value": ["x" * 200] * 200_000})
        ballast.unlink()
        assert _keys(warehouse) == {"kept"}  # the failed write was rolled back, nothing stored was lost
        _write(warehouse, "after")
        assert _keys(warehouse) == {"kept", "after"}
        seen = _outside_process(
            warehouse.path, "print(con.execute(\"SELECT count(*) FROM meta WHERE key IN ('kept', 'after')\").fetchone()[0])"
        )
        assert seen == "2"


def _in_child(home: str, parent_hosts: set[int], write: bool) -> None:
    from resources.warehouse import duckdb_backend

    warehouse = _warehouse(Path(home))
    if write:
        _write(warehouse, "child")
    assert "parent" in _keys(warehouse)
    used = {id(host) for host in duckdb_backend._hosts.values()}
    assert used and not used & parent_hosts, "the child used a DuckDB host of its parent"


def _fork(home: str, *, write: bool) -> None:
    from resources.warehouse import duckdb_backend

    parent_hosts = {id(host) for host in duckdb_backend._hosts.values()}
    assert parent_hosts
    child = multiprocessing.get_context("fork").Process(target=_in_child, args=(home, parent_hosts, write))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung using the warehouse")
    assert child.exitcode == 0


def test_a_forked_child_uses_a_host_of_its_own(tmp_path):
    warehouse = _warehouse(tmp_path / "home")
    _write(warehouse, "parent")  # the parent's host exists before the fork
    with warehouse.connect(read_only=True):  # and has the file attached for readers while it forks
        _fork(warehouse.home, write=False)
    _fork(warehouse.home, write=True)
    assert _keys(warehouse) == {"parent", "child"}
