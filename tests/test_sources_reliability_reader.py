"""Reading the warehouse with a program outside the pipeline (issue 10, class 7, the outside reader).

The outside program is a real second process with the ``duckdb`` package (the same engine and file
lock as the ``duckdb`` shell) holding ``warehouse.duckdb`` open. Runs must wait for it within
``lock_timeout_seconds`` instead of failing with DuckDB's "Could not set lock on file", fail with a
message that names the file, the holder and what to do when it does not close, and carry on when
it exits or is killed (SIGKILL). The README's recipes for reading safely are run here as written.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from resources import WarehouseResource
from resources.warehouse import WarehouseError
from tests.pipeline_support import make_pipeline


class OutsideReader:
    """Another process with the warehouse open through DuckDB (like `duckdb warehouse.duckdb`)."""

    def __init__(self, path: Path, *, read_only: bool, hold_seconds: float = 3600):
        code = (
            "import duckdb, sys, time\n"
            f"con = duckdb.connect({str(path)!r}, read_only={read_only})\n"
            "print(con.execute('SELECT count(*) FROM documents').fetchone()[0], flush=True)\n"
            f"time.sleep({hold_seconds})\n"
        )
        self.process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.strip().isdigit(), self.process.stderr.read()
        self.pid = self.process.pid

    def kill_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, lambda: self.process.send_signal(signal.SIGKILL))
        timer.start()
        return timer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def warehouse(tmp_path) -> WarehouseResource:
    warehouse = WarehouseResource(home=str(tmp_path / "home"), lock_timeout_seconds=1.0)
    with warehouse.connect() as con:  # the schema
        con.execute("INSERT INTO meta VALUES ('probe', '1')")
    return warehouse


def _write(warehouse: WarehouseResource, value: str) -> None:
    with warehouse.connect() as con:
        con.execute("INSERT INTO meta VALUES ('probe', ?)", [value])


def test_a_holder_that_never_closes_fails_the_write_after_the_bound_naming_file_holder_and_remedy(warehouse):
    for read_only in (False, True):  # `duckdb warehouse.duckdb` and `duckdb -readonly warehouse.duckdb`
        reader = OutsideReader(warehouse.path, read_only=read_only)
        try:
            started = time.monotonic()
            with pytest.raises(WarehouseError) as caught:
                _write(warehouse, "blocked")
            waited = time.monotonic() - started
        finally:
            reader.close()
        message = str(caught.value)
        assert str(warehouse.path) in message and f"process {reader.pid}" in message, message
        assert "Reading the warehouse safely" in message and "lock_timeout_seconds" in message
        assert 1.0 <= waited < 10, waited  # waited the bound, and not much more
    assert warehouse.query_rows("SELECT count(*) FROM meta WHERE value = 'blocked'")[0][0] == 0


def test_readers_share_with_a_read_only_holder_and_a_writer_waits_for_it_to_close(warehouse, caplog):
    caplog.set_level(logging.WARNING, logger="embedding_pipeline.warehouse")
    reader = OutsideReader(warehouse.path, read_only=True, hold_seconds=1.5)
    try:
        started = time.monotonic()
        assert warehouse.query_rows("SELECT count(*) FROM meta WHERE key = 'probe'")[0][0] == 1  # no wait
        assert time.monotonic() - started < 1.0
        slow = WarehouseResource(home=warehouse.home, lock_timeout_seconds=60)
        _write(slow, "after-close")
        assert time.monotonic() - started >= 1.0  # it really waited for the holder
    finally:
        reader.close()
    assert warehouse.query_rows("SELECT count(*) FROM meta WHERE value = 'after-close'")[0][0] == 1
    assert any(f"held open by process {reader.pid}" in r.getMessage() for r in caplog.records)


def test_a_holder_killed_with_sigkill_releases_the_file_to_a_waiting_writer(warehouse):
    reader = OutsideReader(warehouse.path, read_only=False)
    timer = reader.kill_after(1.0)
    try:
        _write(WarehouseResource(home=warehouse.home, lock_timeout_seconds=60), "after-kill")
    finally:
        timer.cancel()
        reader.close()
    assert reader.process.returncode == -signal.SIGKILL
    assert warehouse.query_rows("SELECT count(*) FROM meta WHERE value = 'after-kill'")[0][0] == 1


@pytest.mark.slow
def test_a_source_run_waits_for_an_outside_reader_instead_of_failing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="embedding_pipeline.warehouse")
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance)
        pipeline.run_source("alpha")
        expected = pipeline.rows("SELECT count(*) FROM documents")[0][0]
        (pipeline.sources_root / "alpha" / "fresh.md").write_text("# Fresh\n\nA fresh note on moss, lichen and bark beetles.\n")
        reader = OutsideReader(pipeline.warehouse.path, read_only=True, hold_seconds=3)
        try:
            report = pipeline.run_source("alpha")
        finally:
            reader.close()
        assert report["raw_documents"]["added"] == 1
        assert pipeline.rows("SELECT count(*) FROM documents")[0][0] == expected + 1
        assert any(f"held open by process {reader.pid}" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(shutil.which("flock") is None, reason="util-linux flock not installed")
def test_readme_recipes_export_and_copy_under_the_shared_lock(tmp_path, warehouse):
    """The README's recipes, run as written: both take the pipeline's own lock shared (util-linux
    `flock -s`, the same flock(2) lock), so they never meet a writer mid-batch."""
    home = Path(warehouse.home)
    export = tmp_path / "export"
    script = f"import duckdb; duckdb.connect('warehouse.duckdb', read_only=True).execute(\"EXPORT DATABASE '{export}' (FORMAT parquet)\")"
    subprocess.run(["flock", "-s", "warehouse.lock", sys.executable, "-c", script], cwd=home, check=True, timeout=60)
    assert duckdb.sql(f"SELECT count(*) FROM '{export}/meta.parquet' WHERE key = 'probe'").fetchall() == [(1,)]

    subprocess.run(
        ["flock", "-s", "warehouse.lock", "sh", "-c", f"cp warehouse.duckdb* {tmp_path}/"], cwd=home, check=True, timeout=60
    )
    copy = duckdb.connect(str(tmp_path / "warehouse.duckdb"))  # read-write, as long as one likes
    try:
        assert copy.execute("SELECT count(*) FROM meta WHERE key = 'probe'").fetchone()[0] == 1
        _write(warehouse, "beside-the-copy")  # the copy holds no lock on the real file
    finally:
        copy.close()

    # While a recipe holds the shared lock, a pipeline writer waits on the flock, not on DuckDB.
    holder = subprocess.Popen(["flock", "-s", "warehouse.lock", "sleep", "1"], cwd=home)
    try:
        time.sleep(0.2)
        started = time.monotonic()
        _write(WarehouseResource(home=str(home), lock_timeout_seconds=60), "after-recipe")
        assert time.monotonic() - started >= 0.5
    finally:
        holder.wait(timeout=30)
