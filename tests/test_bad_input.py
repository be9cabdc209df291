"""Bad input: real files with bad bytes, refused paths and invalid settings, through the real graph.

One source, ``bad``, holds one good document next to every kind of bad file; it is materialized
once (module fixture) and the tests read what the run recorded. Nothing here may fail the run.
"""

from __future__ import annotations

import os
import shutil

import dagster as dg
import faiss
import numpy as np
import pytest

from embedding_assets.core.identity import embedding_cache_key
from embedding_assets.core.ivf import build_index, set_nprobe
from embedding_assets.core.sources import SourceError, scan_source
from embedding_assets.runner import RunFailed
from resources import DocumentSourcesResource, EmbeddingCacheResource, EmbeddingModelResource
from resources.cache import EmbeddingCacheConfigError, encode_vector
from resources.model import ModelConfigError
from tests.pipeline_support import FIXTURE_CORPUS, make_pipeline

MAX_FILE_BYTES = 64 * 1024
GOOD = "chess-endgames.txt"
def prose(topic: str) -> str:
    """Distinct text per file, so that deduplication keeps every file's chunks."""
    return " ".join(f"{topic} note {i}: the {topic} keeper counted {i * 7} visitors on day {i}." for i in range(12))


def _write_bad_files(folder, outside):
    """Every bad input the issue lists; returns {relative path: what must happen to it}."""
    shutil.copy(FIXTURE_CORPUS / "alpha" / GOOD, folder / GOOD)
    (folder / "invalid-utf8.txt").write_bytes(prose("garden").encode() + b"\xff\xfe\xc3\x28 broken \xa0\xa1 bytes. " + prose("orchard").encode())
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (folder / "empty.txt").write_bytes(b"")
    (folder / "whitespace.md").write_bytes(b"   \n\n\t  \n")
    (folder / "too-big.txt").write_bytes(b"words and more words. " * (MAX_FILE_BYTES // 20))
    (folder / "no-text.html").write_bytes(
        b"<html><head><title></title><script>var x = 'not text';</script><style>p{}</style></head>"
        b"<body><div><img src='a.png'></div><nav></nav></body></html>"
    )
    (folder / "long-line.txt").write_bytes((("supercalifragilistic" * 400 + " ") * 3 + prose("ledger") * 20).encode())
    (folder / "nested.html").write_bytes(
        b"<html><body>" + b"<div>" * 5000 + prose("nesting").encode() + b"</div>" * 5000 + b"</body></html>"
    )
    (folder / "nul-bytes.md").write_bytes(b"# Heading\x00\n\n" + prose("crabs").encode().replace(b"keeper", b"kee\x00per"))
    (folder / "bom-utf8.md").write_bytes(b"\xef\xbb\xbf# Rock pools\n\n" + prose("rockpool").encode())
    (folder / "utf16-le.txt").write_bytes(b"\xff\xfe" + ("Lighthouse keepers " + prose("lighthouse")).encode("utf-16-le"))
    (folder / "utf16-be.txt").write_bytes(b"\xfe\xff" + ("Volcanic vineyards " + prose("vineyard")).encode("utf-16-be"))
    (folder / "latin1-declared.html").write_bytes(
        "<html><head><meta charset='iso-8859-1'></head><body><p>Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1")
        + prose("cafe").encode() + b"</p></body></html>"
    )
    # Refused without being read.
    (outside / "secret.txt").write_text("outside secret text that must never be ingested")
    os.symlink(outside / "secret.txt", folder / "escape.txt")
    os.symlink(outside, folder / "escape-dir")
    os.symlink("../../outside/secret.txt", folder / "dotdot.txt")
    os.mkfifo(folder / "pipe.txt")  # reading a FIFO with no writer would block forever
    os.symlink(folder / GOOD, folder / "inside-link.txt")  # a link that stays inside is fine


QUARANTINED = {  # path -> words its reason must contain
    "binary.txt": "binary",
    "empty.txt": "no text",
    "whitespace.md": "no text",
    "no-text.html": "no text",
}
SKIPPED = {
    "too-big.txt": "larger than the limit",
    "escape.txt": "outside the source folder",
    "dotdot.txt": "outside the source folder",
    "escape-dir": "symlinked folder",
    "pipe.txt": "not a regular file",
}
CLEANED_WITH_WARNING = {
    "invalid-utf8.txt": "invalid UTF-8 replaced",
    "nul-bytes.md": "NUL bytes removed",
    "utf16-le.txt": "UTF-16",
    "utf16-be.txt": "UTF-16",
    "latin1-declared.html": "iso-8859-1",
}
CLEANED = {GOOD, "long-line.txt", "nested.html", "bom-utf8.md", "inside-link.txt", *CLEANED_WITH_WARNING}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp, instance, copy_corpus=False)
        pipeline.resources["sources"] = DocumentSourcesResource(root=str(pipeline.sources_root), max_file_bytes=MAX_FILE_BYTES)
        from embedding_assets.definitions import build_definitions

        pipeline.defs = build_definitions(pipeline.resources)
        folder = pipeline.sources_root / "bad"
        folder.mkdir(parents=True)
        outside = tmp / "outside"
        outside.mkdir()
        _write_bad_files(folder, outside)
        report = pipeline.run_source("bad")
        yield pipeline, report


@pytest.mark.slow
def test_bad_files_never_fail_the_run_and_good_documents_are_embedded(bad_run):
    pipeline, report = bad_run
    paths = {p for (p,) in pipeline.rows("SELECT relative_path FROM documents WHERE source = 'bad'")}
    assert paths == CLEANED | set(QUARANTINED)
    cleaned = {
        p for (p,) in pipeline.rows(
            "SELECT d.relative_path FROM cleaned_documents c JOIN documents d USING (doc_id) WHERE c.source = 'bad'"
        )
    }
    assert cleaned == CLEANED
    embedded = {
        p for (p,) in pipeline.rows(
            """SELECT DISTINCT d.relative_path FROM embeddings e JOIN chunks k USING (chunk_id)
               JOIN documents d USING (doc_id) WHERE e.source = 'bad'"""
        )
    }
    # inside-link.txt duplicates the good file, so its chunks are deduplicated away.
    assert embedded >= CLEANED - {"inside-link.txt"}
    assert report["embeddings"]["row_count"] > 0


@pytest.mark.slow
def test_quarantine_records_path_and_reason_in_table_and_metadata(bad_run):
    pipeline, report = bad_run
    rows = dict(pipeline.rows("SELECT relative_path, reason FROM quarantine WHERE source = 'bad'"))
    assert set(rows) == set(QUARANTINED)
    for path, words in QUARANTINED.items():
        assert words in rows[path], (path, rows[path])
    meta = report["cleaned_documents"]
    assert meta["quarantined"] == len(QUARANTINED)
    for path in QUARANTINED:
        assert path in meta["quarantine"]


@pytest.mark.slow
def test_empty_file_is_quarantined_not_silently_dropped(bad_run):
    pipeline, _ = bad_run
    rows = pipeline.rows("SELECT stage, reason FROM quarantine WHERE source = 'bad' AND relative_path = 'empty.txt'")
    assert rows and rows[0][0] == "cleaned_documents" and "no text" in rows[0][1]


@pytest.mark.slow
def test_refused_files_are_recorded_and_never_read(bad_run):
    pipeline, report = bad_run
    rows = dict(pipeline.rows("SELECT relative_path, reason FROM skipped_files WHERE source = 'bad'"))
    assert set(rows) == set(SKIPPED)
    for path, words in SKIPPED.items():
        assert words in rows[path], (path, rows[path])
    meta = report["raw_documents"]
    assert meta["skipped"] == len(SKIPPED)
    for path in SKIPPED:
        assert path in meta["skipped_files"]
    leaked = pipeline.rows("SELECT count(*) FROM chunks WHERE text LIKE '%outside secret%'")[0][0]
    assert leaked == 0


@pytest.mark.slow
def test_recoverable_encodings_are_cleaned_with_a_warning(bad_run):
    pipeline, report = bad_run
    warnings = dict(
        pipeline.rows(
            "SELECT d.relative_path, c.warnings FROM cleaned_documents c JOIN documents d USING (doc_id) WHERE c.source = 'bad'"
        )
    )
    for path, words in CLEANED_WITH_WARNING.items():
        assert words in warnings[path], (path, warnings[path])
    assert report["cleaned_documents"]["warnings"] >= len(CLEANED_WITH_WARNING)
    texts = dict(
        pipeline.rows(
            "SELECT d.relative_path, c.text FROM cleaned_documents c JOIN documents d USING (doc_id) WHERE c.source = 'bad'"
        )
    )
    assert "\x00" not in "".join(texts.values())
    assert texts["bom-utf8.md"].startswith("Rock pools") and "\ufeff" not in texts["bom-utf8.md"]
    assert texts["utf16-be.txt"].startswith("Volcanic vineyards")
    assert "Caf\u00e9 cr\u00e8me" in texts["latin1-declared.html"]
    assert "crabs keeper" in texts["nul-bytes.md"]
    assert "nesting keeper" in texts["nested.html"]


@pytest.mark.slow
def test_long_lines_and_giant_words_stay_within_the_token_limit(bad_run):
    pipeline, report = bad_run
    limit = report["chunks"]["token_limit"]
    rows = pipeline.rows(
        """SELECT k.token_count, k.start_char, k.end_char, k.text, c.text FROM chunks k
           JOIN cleaned_documents c USING (doc_id) JOIN documents d USING (doc_id)
           WHERE d.relative_path = 'long-line.txt'"""
    )
    assert len(rows) > 3
    tokenizer = pipeline.resources["model"].tokenizer()
    for count, start, end, text, cleaned in rows:
        assert count <= limit
        assert cleaned[start:end] == text
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit


def test_paths_with_dotdot_and_bad_source_names_are_refused(tmp_path):
    (tmp_path / "ok").mkdir()
    for name in ("..", "../ok", "ok/../ok", "/etc", ".hidden", ""):
        with pytest.raises(SourceError, match="not allowed"):
            scan_source(tmp_path, name, max_file_bytes=1000)


@pytest.mark.slow
def test_unknown_source_fails_the_run_with_a_message_naming_it(bad_run):
    pipeline, _ = bad_run
    with pytest.raises(RunFailed, match="no-such-source"):
        pipeline.run_source("no-such-source")


# --------------------------------------------------------------------------- invalid configuration


def test_unknown_model_path_fails_fast_naming_the_setting(tmp_path):
    model = EmbeddingModelResource(model=str(tmp_path / "no-model-here"))
    with pytest.raises(ModelConfigError, match="EMBEDDING_MODEL"):
        model.model_fingerprint()
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelConfigError, match="EMBEDDING_MODEL.*not a model folder"):
        EmbeddingModelResource(model=str(tmp_path / "not-a-model")).tokenizer()


@pytest.mark.slow
def test_unknown_model_path_fails_the_run_before_any_chunk_is_written(tmp_path):
    with dg.instance_for_test() as instance:
        pipeline = make_pipeline(tmp_path, instance, model=str(tmp_path / "missing-model"))
        with pytest.raises(RunFailed, match="EMBEDDING_MODEL"):
            pipeline.run_source("alpha")
        assert pipeline.rows("SELECT count(*) FROM chunks")[0][0] == 0


def test_nprobe_above_nlist_is_refused_naming_nprobe():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index("IVF8,Flat", 16, vectors)
    with pytest.raises(ValueError, match=r"nprobe must be in \[1, 8\].*got 9"):
        set_nprobe(index, 9)
    with pytest.raises(ValueError, match="nprobe"):
        set_nprobe(index, 0)
    set_nprobe(index, 8)
    assert faiss.extract_index_ivf(index).nprobe == 8


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://127.0.0.1:6379/0", "scheme"),
        ("redis://:hunter2@127.0.0.1:notaport/0", "cannot be parsed"),
        ("redis:///0", "names no host"),
        ("redis://127.0.0.1:6379/zero", "database"),
    ],
)
def test_bad_redis_url_fails_fast_naming_the_setting_without_the_password(tmp_path, url, words):
    with pytest.raises(EmbeddingCacheConfigError, match="redis_url") as caught:
        EmbeddingCacheResource(home=str(tmp_path), redis_url=url)
    assert words in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_bad_redis_url_from_the_environment_fails_the_run_without_the_password(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDDING_REDIS_URL", "http://:hunter2@127.0.0.1:6379/0")
    cache = EmbeddingCacheResource(home=str(tmp_path), redis_url=dg.EnvVar("EMBEDDING_REDIS_URL"))
    with pytest.raises(EmbeddingCacheConfigError, match="redis_url") as caught:
        cache.get_many(["k"], 4)
    assert "hunter2" not in str(caught.value)


def test_cached_vector_of_another_dimension_is_a_miss_and_gets_overwritten(tmp_path):
    cache = EmbeddingCacheResource(home=str(tmp_path), lru_entries=0)
    key = embedding_cache_key("model-x", "a" * 64)
    cache.set_many([(key, np.ones(128, dtype=np.float32))])
    assert cache.get_many([key], 384) == [None]
    assert cache.stats()["corrupt"] == 1
    cache.set_many([(key, np.full(384, 0.5, dtype=np.float32))])
    (vector,) = cache.get_many([key], 384)
    assert vector is not None and vector.shape == (384,) and float(vector[0]) == 0.5
    # and the stored bytes are exactly the new value
    import sqlite3

    with sqlite3.connect(cache.disk_path) as con:
        (value,) = con.execute("SELECT value FROM embeddings WHERE key = ?", [key]).fetchone()
    assert value == encode_vector(np.full(384, 0.5, dtype=np.float32), key)
