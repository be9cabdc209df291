"""Stray paths inside a source, and what counts as a source folder (issue 10, classes 1 and 3).

Real files, names made of raw bytes, symlink loops, FIFOs, sockets, device nodes and bind mounts,
through the real graph (real model, DuckDB, Dagster). One stray path must never fail a source: it is
reported with its (escaped) name and reason, the rest is indexed. Folder names with spaces or
non-ASCII letters are sources; every entry that is not a source is refused with a reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import unicodedata
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.core.sources import (
    SourceError,
    absent_paths,
    display_name,
    find_sources,
    list_sources,
    scan_source,
    source_name_problem,
)
from embedding_assets.partitions import SOURCES_PARTITIONS_NAME
from embedding_assets.runner import RunFailed
from embedding_assets.sensors import source_fingerprint, sources_sensor
from resources import DocumentSourcesResource
from tests.pipeline_support import make_pipeline


def prose(topic: str) -> str:
    """Distinct text per file, so that deduplication keeps every file's chunks."""
    return " ".join(f"{topic} note {i}: the {topic} warden logged {i * 11} sightings on day {i}." for i in range(10))


def _bytes_path(folder: Path, name: bytes) -> bytes:
    return os.fsencode(folder) + b"/" + name


# --------------------------------------------------------------------------- class 1: stray paths

GOOD_STRAY_NEIGHBOURS = {  # valid names, however odd: indexed under exactly this name
    "good.md": prose("heron"),
    "with space and émoji 🦉.md": prose("owl"),
    "new\nline.txt": prose("newt"),
    "back\\slash.txt": prose("badger"),
    "deep/" + "/".join(f"level{i}" for i in range(60)) + "/bottom.txt": prose("mole"),
    "kept/inside-link-target.md": prose("otter"),
}


def _write_stray_source(folder: Path, outside: Path, mountable: bool) -> dict[str, str]:
    """Good documents next to every stray path; returns {escaped relative path: words its reason must contain}."""
    for relative, text in GOOD_STRAY_NEIGHBOURS.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    os.symlink("inside-link-target.md", folder / "kept" / "inside-link.md")  # stays inside: indexed (a duplicate)
    strays = {}
    # Names that are not UTF-8 (Latin-1 and a lone continuation byte), as a file and as a folder with a document.
    with open(_bytes_path(folder, b"caf\xe9.txt"), "wb") as fh:
        fh.write(prose("latin").encode())
    strays["caf\\xe9.txt"] = "file name is not valid UTF-8"
    os.mkdir(_bytes_path(folder, b"notes-\x80"))
    with open(_bytes_path(folder, b"notes-\x80/inside.md"), "wb") as fh:
        fh.write(prose("hidden-by-name").encode())
    strays["notes-\\x80"] = "folder name is not valid UTF-8"
    # Symlink loops: to itself, a two-link cycle, and a folder link back up (never followed).
    os.symlink("self.md", folder / "self.md")
    os.symlink("ping.md", folder / "pong.md")
    os.symlink("pong.md", folder / "ping.md")
    strays.update({"self.md": "symlink loop", "ping.md": "symlink loop", "pong.md": "symlink loop"})
    os.symlink("..", folder / "deep" / "up")
    strays["deep/up"] = "symlinked folder not followed"
    os.symlink("gone.md", folder / "dangling.md")
    strays["dangling.md"] = "dangling symlink"
    (outside / "secret.md").write_text("outside secret words that must never be indexed")
    os.symlink(outside / "secret.md", folder / "escape.md")
    strays["escape.md"] = "outside the source folder"
    # Files that are not regular: FIFO (opening it would block), socket, character device.
    os.mkfifo(folder / "pipe.txt")
    strays["pipe.txt"] = "not a regular file"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "socket.md"))
    listener.close()
    strays["socket.md"] = "not a regular file"
    try:
        os.mknod(folder / "null.txt", 0o600 | 0o020000, os.makedev(1, 3))
        strays["null.txt"] = "not a regular file"
    except PermissionError:
        pass  # no CAP_MKNOD here: the FIFO and the socket still cover non-regular files
    if mountable:  # an ancestor bind-mounted below itself: a walk that follows it never ends
        (folder / "mirror").mkdir()
        subprocess.run(["mount", "--bind", str(folder), str(folder / "mirror")], check=True)
        strays["mirror"] = "folder met twice"
    return strays


def _can_mount(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["mount", "--bind", str(probe), str(probe)], capture_output=True).returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


@pytest.fixture(scope="module")
def stray_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strays")
    mountable = _can_mount(tmp)
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp, instance, copy_corpus=False)
        folder = pipeline.sources_root / "strays"
        folder.mkdir()
        (tmp / "outside").mkdir()
        strays = _write_stray_source(folder, tmp / "outside", mountable)
        try:
            report = pipeline.run_source("strays")
            yield pipeline, report, strays, mountable
        finally:
            if mountable:
                subprocess.run(["umount", "-l", str(folder / "mirror")], check=False)


@pytest.mark.slow
def test_every_stray_path_is_reported_and_the_rest_is_indexed(stray_run):
    pipeline, report, strays, _ = stray_run
    stored = {p for (p,) in pipeline.rows("SELECT relative_path FROM documents WHERE source = 'strays'")}
    assert stored == set(GOOD_STRAY_NEIGHBOURS) | {"kept/inside-link.md"}
    skipped = dict(pipeline.rows("SELECT relative_path, reason FROM skipped_files WHERE source = 'strays'"))
    assert set(skipped) == set(strays), (sorted(skipped), sorted(strays))
    for path, words in strays.items():
        assert words in skipped[path], (path, skipped[path])
    assert report["raw_documents"]["skipped"] == len(strays)
    embedded = {
        p for (p,) in pipeline.rows(
            "SELECT DISTINCT d.relative_path FROM embeddings e JOIN chunks k USING (chunk_id) JOIN documents d USING (doc_id)"
        )
    }
    assert embedded == set(GOOD_STRAY_NEIGHBOURS)  # the inside link duplicates its target: deduplicated
    leaked = pipeline.rows(
        "SELECT count(*) FROM chunks WHERE text LIKE '%outside secret%' OR text LIKE '%hidden-by-name%' OR text LIKE '%latin note%'"
    )[0][0]
    assert leaked == 0


@pytest.mark.slow
def test_escaped_names_are_valid_text_and_name_the_real_bytes(stray_run):
    pipeline, _, _, _ = stray_run
    folder = pipeline.sources_root / "strays"
    on_disk = {display_name(os.fsdecode(name)) for name in os.listdir(os.fsencode(folder))}
    assert {"caf\\xe9.txt", "notes-\\x80"} <= on_disk  # the escape is what `ls -b` would show
    for (path,) in pipeline.rows("SELECT relative_path FROM skipped_files WHERE source = 'strays'"):
        path.encode("utf-8")  # DuckDB VARCHAR round trip gave valid text


@pytest.mark.slow
def test_the_sensor_fingerprints_a_source_full_of_strays_and_sees_a_fix(stray_run):
    pipeline, _, _, _ = stray_run
    folder = pipeline.sources_root / "strays"
    before = source_fingerprint(folder)  # the old walk raised on the Latin-1 name (UTF-8 encode of the line)
    assert before == source_fingerprint(folder)
    os.rename(_bytes_path(folder, b"caf\xe9.txt"), folder / "cafe.txt")
    try:
        assert source_fingerprint(folder) != before
        scan = scan_source(pipeline.sources_root, "strays", max_file_bytes=1 << 20)
        assert "cafe.txt" in {f.relative_path for f in scan.files}
    finally:
        os.rename(folder / "cafe.txt", _bytes_path(folder, b"caf\xe9.txt"))
    assert source_fingerprint(folder) == before


@pytest.mark.slow
def test_a_rerun_with_the_same_strays_changes_nothing(stray_run):
    pipeline, _, strays, _ = stray_run
    again = pipeline.run_source("strays")["raw_documents"]
    assert (again["added"], again["updated"], again["deleted"]) == (0, 0, 0)
    assert again["skipped"] == len(strays)


@pytest.mark.slow
def test_a_stored_document_replaced_by_a_stray_path_is_deleted(tmp_path):
    """A refusal (not a read error) means the path is no document: its stored version leaves."""
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance, copy_corpus=False)
        folder = pipeline.sources_root / "swap"
        folder.mkdir()
        for name in ("stay.md", "to-loop.md", "to-fifo.txt"):
            (folder / name).write_text(prose(name))
        assert pipeline.run_source("swap")["raw_documents"]["added"] == 3
        (folder / "to-loop.md").unlink()
        os.symlink("to-loop.md", folder / "to-loop.md")
        (folder / "to-fifo.txt").unlink()
        os.mkfifo(folder / "to-fifo.txt")
        raw = pipeline.run_source("swap")["raw_documents"]
        assert (raw["deleted"], raw["skipped"]) == (2, 2)
        assert pipeline.rows("SELECT relative_path FROM documents WHERE source = 'swap'") == [("stay.md",)]


def test_absent_paths_deletes_only_what_a_good_listing_lacks():
    stored = ["a.md", "sub/b.md", "sub/deeper/c.md", "subway.md", "x/y.md"]
    assert absent_paths(stored, {"a.md"}, ["sub"]) == ["subway.md", "x/y.md"]  # component match, not prefix
    assert absent_paths(stored, set(), ["sub/deeper/c.md", "x"]) == ["a.md", "sub/b.md", "subway.md"]
    assert absent_paths(stored, set(stored), []) == []


# --------------------------------------------------------------------------- class 3: source folders

SOURCE_TEXTS = {
    "my docs": prose("lighthouse"),
    "données": prose("glacier"),  # NFC
    unicodedata.normalize("NFD", "été notes"): prose("meadow"),  # combining accents, as macOS writes them
    "日本語 メモ": prose("bamboo"),
    "Q3 (draft) & review": prose("tidal"),
}
REFUSED_NAMES = {  # folder name -> words of the reason
    "a...b": "reserved",
    "tab\tname": "not allowed",
    " leading": "start with a letter",
    "trailing ": "end with a space",
    "semi;colon": "not allowed",
    "x" * 129: "longer than 128",
}


@pytest.fixture
def sources_root(tmp_path) -> Path:
    root = tmp_path / "sources"
    root.mkdir()
    for name, text in SOURCE_TEXTS.items():
        (root / name).mkdir()
        (root / name / "doc.md").write_text(text)
    for name in REFUSED_NAMES:
        (root / name).mkdir()
        (root / name / "doc.md").write_text(prose("refused"))
    os.mkdir(_bytes_path(root, b"bad-\xff"))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.md").write_text("outside secret words")
    os.symlink(tmp_path / "outside", root / "linked-out")
    os.symlink("..", root / "linked-up")
    os.symlink(".", root / "linked-root")
    os.symlink("my docs", root / "alias")  # stays inside the root: a source like any other
    os.symlink("nowhere", root / "dangling")
    os.symlink("loop", root / "loop")
    (root / "loose.md").write_text("a file directly under the root")
    (root / ".git").mkdir()  # hidden: neither a source nor reported
    return root


def test_spaces_and_non_ascii_names_are_sources_and_the_rest_is_refused_with_a_reason(sources_root):
    listing = find_sources(sources_root)
    assert listing.sources == sorted([*SOURCE_TEXTS, "alias"])
    refused = {entry.relative_path: entry.reason for entry in listing.refused}
    expected = {
        **REFUSED_NAMES,
        "bad-\\xff": "not valid UTF-8",
        "linked-out": "outside the sources root",
        "linked-up": "outside the sources root",
        "linked-root": "sources root itself",
        "dangling": "leads nowhere",
        "loop": "symlink loop",
        "loose.md": "belongs to no source",
    }
    assert set(refused) == set(expected)
    for name, words in expected.items():
        assert words in refused[name], (name, refused[name])
    assert DocumentSourcesResource(root=str(sources_root)).refused_sources() == listing.refused


def test_refused_sources_are_logged_and_refused_by_name(sources_root, caplog):
    caplog.set_level("WARNING", logger="embedding_pipeline.sources")
    list_sources(sources_root)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "linked-out is not a source: symlink leads outside" in logged
    assert "bad-\\xff is not a source" in logged
    for name in ("linked-out", "linked-up", "linked-root", "loose.md"):
        with pytest.raises(SourceError, match="refused"):
            scan_source(sources_root, name, max_file_bytes=1 << 20)
    for name in REFUSED_NAMES:
        with pytest.raises(SourceError, match="not allowed"):
            scan_source(sources_root, name, max_file_bytes=1 << 20)


def test_the_sensor_and_the_listing_agree_on_what_a_source_is(sources_root):
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"sources": DocumentSourcesResource(root=str(sources_root))})
        result = sources_sensor(context)
        requested = {r.partition_key for r in result.run_requests}
        assert requested == set(find_sources(sources_root).sources)
        for name in requested:
            assert source_fingerprint(sources_root / name) != "empty"
            instance.add_dynamic_partitions(SOURCES_PARTITIONS_NAME, [name])  # valid Dagster partition keys
        assert set(instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME)) == requested


def test_source_name_rule():
    for name in SOURCE_TEXTS:
        assert source_name_problem(name) is None, name
    for name in REFUSED_NAMES:
        assert source_name_problem(name), name
    for name in ("..", ".", "", "../x", "a/b", "/etc", "nul\x00", os.fsdecode(b"x\xff")):
        assert source_name_problem(name), name


@pytest.mark.slow
def test_sources_with_spaces_and_accents_run_end_to_end_and_outside_links_fail_clearly(tmp_path):
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance, copy_corpus=False)
        root = pipeline.sources_root
        for name in ("my docs", "données", unicodedata.normalize("NFD", "été notes")):
            (root / name).mkdir()
            (root / name / "doc.md").write_text(SOURCE_TEXTS[name])
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "secret.md").write_text(prose("secret"))
        os.symlink(tmp_path / "outside", root / "linked-out")
        for name in list_sources(root):
            assert pipeline.run_source(name)["raw_documents"]["added"] == 1
        with pytest.raises(RunFailed, match="outside the sources root"):
            pipeline.run_source("linked-out")
        index = pipeline.run_index()
        assert index["row_count"] == pipeline.rows("SELECT count(*) FROM embeddings")[0][0] > 0
        sources = {s for (s,) in pipeline.rows("SELECT DISTINCT source FROM documents")}
        assert sources == {"my docs", "données", unicodedata.normalize("NFD", "été notes")}
        hits = pipeline.search("glacier warden sightings", k=3)
        assert hits and hits[0].source == "données"
        assert pipeline.rows("SELECT count(*) FROM chunks WHERE text LIKE '%secret note%'")[0][0] == 0
