"""Damaged state and errors a person can act on, through the real CLI (issue 10, classes 5 and 6).

Each case starts the real `embedding-pipeline` as a subprocess on a copy of a published home and
injects the fault for real: a warehouse file overwritten with random bytes, truncated, emptied,
replaced by a folder, stamped with another schema version, made unreadable for a process without
root's override (``setpriv``), a real tmpfs filled to the last block, a lock held by another
process, bad settings, missing inputs. Every expected failure must be one ``error:`` line naming the
file or input and what to do, no Python traceback, a non-zero exit status (2 for bad input or
settings, 1 for a failed run); ``search`` keeps answering from the published index (it never opens
the warehouse) and nothing published is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

from resources.locks import file_lock
from resources.warehouse import SCHEMA_VERSION
from tests.disk_support import fill, mounted_tmpfs
from tests.cli_support import (
    cli, cli_env, clone_state, copy_corpus, ok, one_error, search_hits, tree_digest, unprivileged_prefix,
)

# Runs the asset graph with the real model (in process or through the CLI): `make test-fast` skips it.
pytestmark = pytest.mark.slow

QUERY = "honey bees keep warm in a winter cluster"
NEW_DOC = "# Moss\n\nMoss and lichen grow on old dry-stone walls; lichen is a fungus living with an alga.\n"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """alpha and beta materialized and the index published once, by the CLI; tests damage copies."""
    base = tmp_path_factory.mktemp("published")
    copy_corpus(base / "sources")
    env = cli_env(base)
    report = json.loads(ok(cli(env, "materialize", "--json")).stdout)
    hits = search_hits(env, QUERY)
    assert hits and hits[0]["doc_path"] == "winter-beekeeping.md"
    return {"base": base, "report": report, "hits": [(h["source"], h["doc_path"]) for h in hits]}


@pytest.fixture
def damaged(published, tmp_path) -> dict[str, str]:
    """A private copy of the published state: its CLI environment."""
    clone_state(published["base"], tmp_path)
    return cli_env(tmp_path)


def _warehouse(env: dict[str, str]) -> Path:
    return Path(env["EMBEDDING_HOME"]) / "warehouse.duckdb"


def _index(env: dict[str, str]) -> Path:
    return Path(env["EMBEDDING_HOME"]) / "index"


# --------------------------------------------------------------------------- class 5: a damaged warehouse

def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300_000))


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _header_only(path: Path) -> None:
    os.truncate(path, 4096)  # DuckDB's first header block, nothing after it


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "note.txt").write_text("someone made a folder here")


def _other_schema(path: Path) -> None:
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()


def _text_file(path: Path) -> None:
    path.write_text("this is not a database\n" * 1000)


DAMAGE = {
    "garbage": (_garbage, "is damaged or not a DuckDB 2.0 database"),
    "truncated-half": (_truncate_half, "is damaged or not a DuckDB 2.0 database"),
    "truncated-to-header": (_header_only, "is damaged or not a DuckDB 2.0 database"),
    "empty": (_empty, "is damaged or not a DuckDB 2.0 database"),
    "text-file": (_text_file, "is damaged or not a DuckDB 2.0 database"),
    "folder": (_folder, "is a folder, not a database file"),
    "schema-99": (_other_schema, f"has schema version '99', this release reads {SCHEMA_VERSION}"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_warehouse_is_one_clear_error_and_search_still_answers(kind, damaged, published):
    path = _warehouse(damaged)
    (path.parent / "warehouse.duckdb.wal").unlink(missing_ok=True)
    damage, what = DAMAGE[kind]
    damage(path)
    before_index = tree_digest(_index(damaged))
    before_file = tree_digest(path.parent) if path.is_dir() else path.read_bytes()
    # A new document makes the run need the warehouse for real (nothing can be skipped).
    (Path(damaged["EMBEDDING_SOURCES_DIR"]) / "alpha" / "moss.md").write_text(NEW_DOC)

    for args in (("materialize",), ("materialize", "--source", "beta", "--no-index")):
        line = one_error(cli(damaged, *args), str(path), what, "move it aside", code=1)
        assert "embedding-pipeline materialize" in line
    one_error(cli(damaged, "remove-source", "gone"), str(path), what, code=1)

    # search never opens the warehouse: it answers from the published version, same hits.
    hits = search_hits(damaged, QUERY)
    assert [(h["source"], h["doc_path"]) for h in hits] == published["hits"]
    # Nothing published lost or changed; the damaged file is left as it was for a person to inspect.
    assert tree_digest(_index(damaged)) == before_index
    assert (tree_digest(path.parent) if path.is_dir() else path.read_bytes()) == before_file


def test_following_the_advice_rebuilds_the_warehouse_from_the_cache(damaged, published):
    """The message says: move it aside and materialize; cached embeddings are reused. Do exactly that."""
    path = _warehouse(damaged)
    _garbage(path)
    one_error(cli(damaged, "materialize"), str(path), "move it aside")
    path.rename(path.with_name("warehouse.duckdb.damaged"))
    report = json.loads(ok(cli(damaged, "materialize", "--json")).stdout)
    for name in ("alpha", "beta"):
        summary = report["sources"][name]["summary"]
        assert summary["documents"]["added"] == published["report"]["sources"][name]["summary"]["documents"]["added"]
        assert summary["embedded_by_model"] == 0  # every vector came from the disk cache
    assert report["index"]["row_count"] == published["report"]["index"]["row_count"]
    assert [(h["source"], h["doc_path"]) for h in search_hits(damaged, QUERY)] == published["hits"]


def test_random_bytes_in_place_of_the_wal_lose_nothing(damaged, published):
    """A stray or damaged .wal beside a sound database: DuckDB's checksums reject it, the run succeeds
    and every stored document is still there."""
    path = _warehouse(damaged)
    path.with_name("warehouse.duckdb.wal").write_bytes(os.urandom(50_000))
    report = json.loads(ok(cli(damaged, "materialize", "--json")).stdout)
    for name in ("alpha", "beta"):
        documents = report["sources"][name]["summary"]["documents"]
        assert documents["unchanged"] == published["report"]["sources"][name]["summary"]["documents"]["added"]
        assert documents["deleted"] == 0 and report["sources"][name]["summary"]["embedded_by_model"] == 0
    assert [(h["source"], h["doc_path"]) for h in search_hits(damaged, QUERY)] == published["hits"]


@pytest.mark.parametrize("mode", [0o000, 0o200, 0o444])
def test_unreadable_or_read_only_warehouse_is_one_clear_error(mode, damaged, published, tmp_path):
    """The file's permissions, for a process without root's override (setpriv)."""
    prefix = unprivileged_prefix(tmp_path)
    path = _warehouse(damaged)
    (path.parent / "warehouse.duckdb.wal").unlink(missing_ok=True)
    content = path.read_bytes()
    path.chmod(mode)
    try:
        (Path(damaged["EMBEDDING_SOURCES_DIR"]) / "alpha" / "moss.md").write_text(NEW_DOC)
        done = cli(damaged, "materialize", prefix=prefix)
        one_error(done, str(path), "permission", code=1)
        hits = search_hits(damaged, QUERY, prefix=prefix)
        assert [(h["source"], h["doc_path"]) for h in hits] == published["hits"]
    finally:
        path.chmod(0o644)
    assert path.read_bytes() == content


# --------------------------------------------------------------------------- class 6: a full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 64 MiB tmpfs (see tests/disk_support.py)."""
    with mounted_tmpfs(tmp_path / "mnt", "64m") as mount_point:
        yield mount_point


def _fill(mount_point: Path) -> Path:
    ballast = fill(mount_point)
    assert shutil.disk_usage(mount_point).free == 0
    return ballast


@pytest.mark.parametrize("on_full_disk", ["home", "dagster"])
def test_disk_full_names_the_folder_and_loses_nothing(on_full_disk, published, tmp_path, small_tmpfs):
    clone_state(published["base"], tmp_path)
    moved = small_tmpfs / on_full_disk
    shutil.copytree(tmp_path / on_full_disk, moved)
    env = cli_env(tmp_path, **{"EMBEDDING_HOME" if on_full_disk == "home" else "DAGSTER_HOME": str(moved)})
    (Path(env["EMBEDDING_SOURCES_DIR"]) / "alpha" / "moss.md").write_text(NEW_DOC)
    index_before = tree_digest(_index(env))
    ballast = _fill(small_tmpfs)

    line = one_error(cli(env, "materialize"), "no space left on device", str(moved), code=1)
    assert "free space" in line
    assert tree_digest(_index(env)) == index_before  # the published index is untouched
    assert [(h["source"], h["doc_path"]) for h in search_hits(env, QUERY)] == published["hits"]

    ballast.unlink()  # space again: the same command now succeeds and adds the new document
    report = json.loads(ok(cli(env, "materialize", "--json")).stdout)
    assert report["sources"]["alpha"]["summary"]["documents"]["added"] == 1
    assert report["sources"]["alpha"]["summary"]["documents"]["deleted"] == 0
    assert [h["doc_path"] for h in search_hits(env, "lichen on dry-stone walls", k=1)] == ["moss.md"]


# --------------------------------------------------------------------------- class 6: lock timeouts


def test_warehouse_lock_held_by_another_process_times_out_within_the_bound(damaged):
    """Another process holds the warehouse's write lock (a real flock from a second process)."""
    lock = Path(damaged["EMBEDDING_HOME"]) / "warehouse.lock"
    env = {**damaged, "EMBEDDING_LOCK_TIMEOUT_SECONDS": "2"}
    (Path(env["EMBEDDING_SOURCES_DIR"]) / "alpha" / "moss.md").write_text(NEW_DOC)
    holder = subprocess.Popen(["flock", "-x", str(lock), "sleep", "600"], start_new_session=True)
    try:
        time.sleep(0.5)
        for args in (("materialize",), ("materialize", "--source", "beta"), ("remove-source", "gone")):
            started = time.monotonic()
            done = cli(env, *args)
            one_error(done, str(lock), "another run is using the warehouse", "EMBEDDING_LOCK_TIMEOUT_SECONDS", code=1)
            assert time.monotonic() - started < 120  # bounded: startup + 2 s, never the 900 s default
        assert search_hits(env, QUERY)  # search takes no warehouse lock
    finally:
        os.killpg(holder.pid, 9)
        holder.wait(timeout=30)
    report = json.loads(ok(cli(env, "materialize", "--json")).stdout)  # released: the same run goes through
    assert report["sources"]["alpha"]["summary"]["documents"]["added"] == 1


def test_index_build_lock_held_times_out_naming_the_setting(damaged, published):
    lock = Path(damaged["EMBEDDING_HOME"]) / "index" / "build.lock"
    env = {**damaged, "EMBEDDING_BUILD_LOCK_TIMEOUT_SECONDS": "1"}
    (Path(env["EMBEDDING_SOURCES_DIR"]) / "alpha" / "moss.md").write_text(NEW_DOC)
    before = tree_digest(_index(env))
    with file_lock(lock, exclusive=True, timeout=5):  # flock from this process: the CLI's open conflicts
        line = one_error(cli(env, "materialize"), str(lock), "another index build is still running", code=1)
        assert "EMBEDDING_BUILD_LOCK_TIMEOUT_SECONDS" in line
    assert tree_digest(_index(env)) == before
    index = json.loads(ok(cli(env, "materialize", "--json")).stdout)["index"]
    assert index["row_count"] > published["report"]["index"]["row_count"]


# --------------------------------------------------------------------------- class 6: bad input and settings

BAD_SETTINGS = [
    ("EMBEDDING_BATCH_SIZE", "abc", ("materialize",)),
    ("EMBEDDING_BATCH_SIZE", "abc", ("search", "bees")),
    ("EMBEDDING_LOCK_TIMEOUT_SECONDS", "soon", ("materialize",)),
    ("EMBEDDING_BUILD_LOCK_TIMEOUT_SECONDS", "1h", ("search", "bees")),
    ("EMBEDDING_MAX_FILE_BYTES", "20MB", ("remove-source", "gone")),
    ("EMBEDDING_CACHE_AUDIT_RATE", "often", ("materialize", "--source", "alpha")),
]


@pytest.mark.parametrize("name,value,args", BAD_SETTINGS, ids=[f"{n}-{a[0]}" for n, _, a in BAD_SETTINGS])
def test_bad_settings_are_one_line_naming_the_variable(name, value, args, tmp_path):
    copy_corpus(tmp_path / "sources", ("alpha",))
    env = cli_env(tmp_path, **{name: value})
    one_error(cli(env, *args), name, repr(value), code=2)
    assert not (tmp_path / "home" / "warehouse.duckdb").exists()  # refused before touching anything


@pytest.mark.parametrize("root_kind", ["missing", "a-file"])
def test_missing_sources_root_is_named(root_kind, tmp_path):
    env = cli_env(tmp_path)
    root = Path(env["EMBEDDING_SOURCES_DIR"])
    if root_kind == "a-file":
        root.write_text("not a folder")
    what = "does not exist" if root_kind == "missing" else "is not a folder"
    for args in (("materialize",), ("sources",)):
        one_error(cli(env, *args), str(root), what, "EMBEDDING_SOURCES_DIR", code=2)
    assert not (tmp_path / "home" / "warehouse.duckdb").exists()


def test_search_errors_name_the_input(tmp_path, published):
    env = cli_env(tmp_path)  # nothing published in this home
    one_error(cli(env, "search", "bees"), str(tmp_path / "home" / "index"), "embedding-pipeline materialize", code=1)
    for k in ("0", "-3"):
        one_error(cli(env, "search", "bees", "--k", k), "--k", code=2)
    one_error(cli(cli_env(published["base"]), "search", "bees", "--k", "0"), "--k must be >= 1", code=2)


def test_remove_source_of_an_unknown_or_present_source_is_refused(damaged):
    one_error(cli(damaged, "remove-source", "nosuch"), "'nosuch'", "no partition and no rows", code=2)
    folder = Path(damaged["EMBEDDING_SOURCES_DIR"]) / "beta"
    one_error(cli(damaged, "remove-source", "beta"), str(folder), "still exists", code=2)
    one_error(cli(damaged, "remove-source", "../alpha"), "../alpha", code=2)
    # Nothing was removed by the refusals.
    assert [h["source"] for h in search_hits(damaged, "lighthouse keepers", k=1)] == ["beta"]
