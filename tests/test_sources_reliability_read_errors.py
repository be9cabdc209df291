"""A read error never deletes data (issue 10, class 2).

Real permissions: root's override is dropped (``setpriv`` removes CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH from the process and its bounding set), so ``chmod 000`` really denies the read,
as it does for any unprivileged user. Real races: files deleted, or swapped for a FIFO or a symlink
to a secret, between the listing and the read. Whatever cannot be read keeps its last stored
version (and so its vectors in the index) and is reported with the reason; only a path missing from
a good listing of its folder is a deletion; once readable again, nothing needs re-embedding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_support import index_count
from embedding_assets.core.sources import metadata_lines
from embedding_assets.stages.raw_documents import ingest_source
from resources import IndexStoreResource, WarehouseResource

ROOT = Path(__file__).resolve().parents[1]
DROP = "-dac_override,-dac_read_search"


def prose(topic: str) -> str:
    return " ".join(f"{topic} note {i}: the {topic} ranger recorded {i * 13} tracks on day {i}." for i in range(10))


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory) -> list[str]:
    """Command prefix that runs a process without root's permission override (skips where impossible)."""
    probe = tmp_path_factory.mktemp("probe") / "closed.txt"
    probe.write_text("x")
    probe.chmod(0)
    prefix = [] if os.geteuid() != 0 else ["setpriv", f"--inh-caps={DROP}", f"--bounding-set={DROP}"]
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a permission error real")
    done = subprocess.run([*prefix, "cat", str(probe)], capture_output=True)
    if done.returncode == 0:
        pytest.skip("this process cannot drop its permission override (setpriv refused or no effect)")
    return prefix


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env.update(
        EMBEDDING_HOME=str(tmp / "home"), EMBEDDING_SOURCES_DIR=str(tmp / "sources"),
        DAGSTER_HOME=str(tmp / "dagster"), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
    )
    return env


def _cli(prefix: list[str], env: dict[str, str], *args: str) -> dict:
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "embedding_assets.cli", "materialize", "--json", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


FILES = {
    "a.md": prose("lynx"),
    "b.txt": prose("beaver"),
    "sub/c.md": prose("marten"),
    "sub/deeper/d.rst": prose("stoat"),
    "open/e.md": prose("vole"),
    "f.html": f"<html><body><p>{prose('shrew')}</p></body></html>",
}


def _stored(warehouse: WarehouseResource, source: str) -> dict[str, str]:
    return dict(warehouse.query_rows("SELECT relative_path, content_sha256 FROM documents WHERE source = ?", [source]))


def _indexed_paths(warehouse: WarehouseResource, store: IndexStoreResource) -> set[str]:
    rows = warehouse.query_rows(
        """SELECT DISTINCT d.relative_path FROM embeddings e JOIN chunks k USING (chunk_id) JOIN documents d USING (doc_id)"""
    )
    assert index_count(store.current()) == warehouse.query_rows("SELECT count(*) FROM embeddings")[0][0]
    return {p for (p,) in rows}


@pytest.mark.slow
def test_unreadable_file_and_folders_keep_their_documents_through_a_real_run(tmp_path, unprivileged):
    folder = tmp_path / "sources" / "field"
    for relative, text in FILES.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    env = _env(tmp_path)
    first = _cli([], env)["sources"]["field"]["summary"]
    warehouse, store = WarehouseResource(home=env["EMBEDDING_HOME"]), IndexStoreResource(home=env["EMBEDDING_HOME"])
    before = _stored(warehouse, "field")
    assert set(before) == set(FILES) and _indexed_paths(warehouse, store) == set(FILES), first

    # Faults: a file nobody may read, a folder nobody may enter, a folder that can be listed but
    # whose entries cannot be looked up (r without x). Beside them a real deletion and a new file.
    (folder / "a.md").chmod(0)
    (folder / "sub").chmod(0)
    (folder / "open").chmod(0o600)
    (folder / "b.txt").unlink()
    (folder / "g.md").write_text(prose("weasel"))
    try:
        report = _cli(unprivileged, env)
    finally:
        (folder / "a.md").chmod(0o644)
        (folder / "sub").chmod(0o755)
        (folder / "open").chmod(0o755)
    raw = report["sources"]["field"]["assets"]["raw_documents"]
    assert (raw["added"], raw["deleted"], raw["unchanged"]) == (1, 1, 1)  # g.md new, b.txt gone, f.html same
    after = _stored(warehouse, "field")
    kept = {"a.md", "sub/c.md", "sub/deeper/d.rst", "open/e.md"}
    assert {p: after[p] for p in kept} == {p: before[p] for p in kept}  # the last good versions, untouched
    assert set(after) == kept | {"f.html", "g.md"}
    assert _indexed_paths(warehouse, store) == set(after)  # and so their vectors stay in the published index
    reasons = {q["path"]: q["reason"] for q in report["quarantine"] if q["kind"] == "skipped"}
    assert reasons == {
        "a.md": "unreadable: Permission denied; kept its last stored version",
        "sub": "unreadable folder: Permission denied; kept its 2 stored documents",
        "open/e.md": "unreadable: Permission denied; kept its last stored version",
    }

    # Readable again: nothing to redo, nothing reported any more.
    third = _cli(unprivileged, env)["sources"]["field"]["assets"]["raw_documents"]
    assert (third["added"], third["updated"], third["deleted"], third["unchanged"], third["skipped"]) == (0, 0, 0, 6, 0)
    assert warehouse.query_rows("SELECT count(*) FROM skipped_files WHERE source = 'field'")[0][0] == 0


_STAGE = """
import json, sys
from pathlib import Path
from embedding_assets.core.sources import SourceError, metadata_lines
from embedding_assets.stages.raw_documents import ingest_source
from resources import WarehouseResource
home, root, source, allow_empty = sys.argv[1:5]
try:  # what sensors.source_fingerprint hashes (importing the sensor module here would cost seconds)
    fingerprint = metadata_lines(Path(root) / source)
except OSError as exc:
    fingerprint = f"OSError: {exc.strerror}"
try:
    r = ingest_source(WarehouseResource(home=home), Path(root), source, max_file_bytes=1 << 20, allow_empty=allow_empty == "1")
    print(json.dumps({"added": r.added, "unchanged": r.unchanged, "deleted": r.deleted, "kept": r.kept,
                      "skipped": {s.relative_path: s.reason for s in r.skipped}, "fingerprint": fingerprint}))
except SourceError as exc:
    print(json.dumps({"error": str(exc), "fingerprint": fingerprint}))
"""


def _stage(prefix: list[str], home: Path, root: Path, source: str, allow_empty: bool = False) -> dict:
    done = subprocess.run(
        [*prefix, sys.executable, "-c", _STAGE, str(home), str(root), source, "1" if allow_empty else "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture
def stored_source(tmp_path):
    """A source of four documents already stored (no model needed: stage 1 only)."""
    root = tmp_path / "sources"
    folder = root / "s"
    for relative in ("one.md", "two.md", "nested/three.md", "nested/four.txt"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(prose(relative))
    warehouse = WarehouseResource(home=str(tmp_path / "home"))
    assert ingest_source(warehouse, root, "s", max_file_bytes=1 << 20).added == 4
    return warehouse, root, folder


def test_an_unreadable_source_folder_fails_clearly_and_deletes_nothing_even_with_allow_empty(stored_source, unprivileged):
    warehouse, root, folder = stored_source
    folder.chmod(0)
    try:
        for allow_empty in (False, True):
            out = _stage(unprivileged, Path(warehouse.home), root, "s", allow_empty)
            assert "cannot read the source folder" in out["error"] and "Permission denied" in out["error"], out
            assert out["fingerprint"] == "OSError: Permission denied"  # the sensor logs it and retries next tick
    finally:
        folder.chmod(0o755)
    assert len(_stored(warehouse, "s")) == 4


def test_every_file_unreadable_keeps_everything_and_a_sensor_sees_the_fix(stored_source, unprivileged):
    warehouse, root, folder = stored_source
    paths = [folder / p for p in ("one.md", "two.md", "nested/three.md", "nested/four.txt")]
    for path in paths:
        path.chmod(0)
    try:
        out = _stage(unprivileged, Path(warehouse.home), root, "s")
    finally:
        for path in paths:
            path.chmod(0o644)
    assert (out["added"], out["deleted"], out["kept"]) == (0, 0, 4), out
    assert all("unreadable: Permission denied" in r for r in out["skipped"].values()) and len(out["skipped"]) == 4
    assert len(_stored(warehouse, "s")) == 4
    healthy = _stage(unprivileged, Path(warehouse.home), root, "s")
    assert (healthy["unchanged"], healthy["kept"], healthy["skipped"]) == (4, 0, {})
    assert healthy["fingerprint"] == metadata_lines(folder) != out["fingerprint"]  # the fix triggers a run


def test_nothing_readable_and_documents_missing_is_refused_not_a_wipe(stored_source, unprivileged):
    warehouse, root, folder = stored_source
    (folder / "one.md").unlink()  # really gone
    for name in ("two.md", "nested/three.md", "nested/four.txt"):
        (folder / name).chmod(0)
    try:
        out = _stage(unprivileged, Path(warehouse.home), root, "s")
    finally:
        for name in ("two.md", "nested/three.md", "nested/four.txt"):
            (folder / name).chmod(0o644)
    assert "no file could be read" in out["error"] and "refusing to delete" in out["error"], out
    assert len(_stored(warehouse, "s")) == 4
    assert ingest_source(warehouse, root, "s", max_file_bytes=1 << 20).deleted == 1  # readable: a real deletion


def test_files_vanished_or_swapped_between_listing_and_reading_are_kept_not_deleted_or_followed(stored_source, tmp_path):
    """Real races: the first file read triggers the faults on files read later in the same scan."""
    warehouse, root, folder = stored_source
    secret = tmp_path / "secret.md"
    secret.write_text("outside secret words")

    def strike(stage, done, total, unit):
        if done == 1:  # files are read in path order: nested/four.txt first, then the three below
            (folder / "nested" / "three.md").unlink()
            os.symlink(secret, folder / "nested" / "three.md")  # swapped for a link to a secret
            (folder / "one.md").unlink()
            os.mkfifo(folder / "one.md")  # swapped for a FIFO: opening it must not block
            (folder / "two.md").unlink()  # vanished: an editor's atomic save, a sync tool

    (folder / "nested" / "four.txt").write_text(prose("changed"))  # the first file read is an update
    report = ingest_source(warehouse, root, "s", max_file_bytes=1 << 20, progress=strike)
    assert (report.updated, report.deleted, report.kept) == (1, 0, 3)
    reasons = {s.relative_path: s.reason for s in report.skipped}
    assert reasons == {
        "two.md": "vanished during the scan; kept its last stored version",
        "nested/three.md": "unreadable: Too many levels of symbolic links; kept its last stored version",
        "one.md": "unreadable: changed into a non-regular file during the scan; kept its last stored version",
    }
    contents = [c for (c,) in warehouse.query_rows("SELECT content FROM documents WHERE source = 's'")]
    assert len(contents) == 4 and not any(b"outside secret" in c for c in contents)

    # The next scan sees the new state for what it is: a deletion and two refusals.
    after = ingest_source(warehouse, root, "s", max_file_bytes=1 << 20)
    assert (after.deleted, after.kept) == (3, 0)
    assert {s.relative_path: s.reason for s in after.skipped} == {
        "nested/three.md": "symlink points outside the source folder",
        "one.md": "not a regular file (device, socket or FIFO)",
    }


def test_a_new_unreadable_subfolder_is_reported_and_the_sensor_still_fingerprints_the_source(tmp_path, unprivileged):
    """Before, os.walk dropped an unreadable subfolder silently and the sensor's walk raised on it
    (so the whole source was never fingerprinted again)."""
    root = tmp_path / "sources"
    (root / "s" / "locked").mkdir(parents=True)
    (root / "s" / "locked" / "x.md").write_text(prose("locked"))
    (root / "s" / "free.md").write_text(prose("free"))
    open_fp = metadata_lines(root / "s")
    (root / "s" / "locked").chmod(0)
    try:
        out = _stage(unprivileged, tmp_path / "home", root, "s")
    finally:
        (root / "s" / "locked").chmod(0o755)
    assert out["added"] == 1 and out["skipped"] == {"locked": "unreadable folder: Permission denied"}
    assert out["fingerprint"] != open_fp  # a sensor tick over it does not fail: the folder enters with its reason
