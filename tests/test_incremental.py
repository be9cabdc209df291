"""Incremental runs do only the changed work and propagate deletions (issue 3).

One base run (both fixture sources + index) is made once; every test works on its own copy of the
sources folder and home, so each starts from the same published state.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from embedding_assets.core import cleaning
from embedding_assets.runner import RunFailed
from tests.pipeline_support import QUERIES, make_pipeline

# Runs the asset graph with the real model (in process or through the CLI): `make test-fast` skips it.
pytestmark = pytest.mark.slow

SOURDOUGH_QUERY = next(q["query"] for q in QUERIES if "sourdough" in q["expected_path"])
CHESS_QUERY = next(q["query"] for q in QUERIES if "chess" in q["expected_path"])


@pytest.fixture(scope="module")
def base(tmp_path_factory, instance, warehouse_backend, warehouse_databases):
    pipeline = make_pipeline(
        tmp_path_factory.mktemp("base"), instance, warehouse_url=warehouse_databases.new(warehouse_backend)
    )
    pipeline.run_all()
    return pipeline


@pytest.fixture
def pipe(base, tmp_path, instance, warehouse_databases):
    """A copy of the base state: same sources, same warehouse, cache and published index."""
    shutil.copytree(base.sources_root, tmp_path / "sources")
    shutil.copytree(base.home, tmp_path / "home")
    return make_pipeline(tmp_path, instance, copy_corpus=False, warehouse_url=warehouse_databases.clone(base.warehouse.url))


def table_digest(pipe, table: str) -> tuple:
    if pipe.warehouse.backend == "postgresql":
        return pipe.rows(f"SELECT count(*), sum(hashtextextended(t::text, 0)) FROM {table} t")[0]
    return pipe.rows(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM {table}")[0]


def index_ids(pipe) -> set[int]:
    current = pipe.resources["index_store"].current()
    return set(np.load(current.path / "ids.npy").tolist())


def live_vector_ids(pipe, source: str | None = None) -> set[int]:
    where = "AND k.source = ?" if source else ""
    return {
        r[0]
        for r in pipe.rows(
            f"SELECT k.vector_id FROM chunks k JOIN chunk_dedup x USING (chunk_id) WHERE x.status = 'canonical' {where}",
            [source] if source else None,
        )
    }


def test_unchanged_rerun_does_nothing_and_rewrites_nothing(pipe):
    tables = ("documents", "skipped_files", "cleaned_documents", "chunks", "chunk_dedup", "embeddings", "quantized_embeddings")
    before = {t: table_digest(pipe, t) for t in tables}
    version = pipe.resources["index_store"].current().version
    (pipe.sources_root / "alpha" / "chess-endgames.txt").touch()  # a new mtime alone is no change
    report = pipe.run_source("alpha")
    assert report["raw_documents"]["unchanged"] == 6
    assert report["raw_documents"]["added"] == report["raw_documents"]["updated"] == 0
    assert report["cleaned_documents"]["cleaned"] == 0
    assert report["chunks"]["documents_chunked"] == 0 and report["chunks"]["chunks_added"] == 0
    assert report["deduped_chunks"]["decided"] == 0
    assert report["embeddings"]["embedded_by_model"] == 0
    assert report["quantized_embeddings"]["quantized"] == 0
    index = pipe.run_index()
    assert index["build_mode"] == "unchanged" and index["version"] == version
    assert {t: table_digest(pipe, t) for t in tables} == before


def test_editing_one_paragraph_embeds_only_that_files_new_chunks(pipe):
    path = pipe.sources_root / "alpha" / "chess-endgames.txt"
    text = path.read_text()
    paragraphs = text.split("\n\n")
    paragraphs[1] = "Zugzwang drills: set up the king and pawn against king position every morning and play it out blindfold."
    path.write_text("\n\n".join(paragraphs))
    # embed_sha256: the hash of what the model reads (contextual text), the embeddings' cache key.
    old = {r[0]: r[1] for r in pipe.rows("SELECT chunk_id, embed_sha256 FROM chunks k JOIN documents d USING (doc_id) WHERE d.relative_path = 'chess-endgames.txt'")}
    known_texts = {r[0] for r in pipe.rows("SELECT text_sha256 FROM embeddings")}

    report = pipe.run_source("alpha")

    new = {r[0]: r[1] for r in pipe.rows("SELECT chunk_id, embed_sha256 FROM chunks k JOIN documents d USING (doc_id) WHERE d.relative_path = 'chess-endgames.txt'")}
    assert report["raw_documents"]["updated"] == 1 and report["raw_documents"]["unchanged"] == 5
    assert report["cleaned_documents"]["cleaned"] == 1
    assert report["chunks"]["documents_chunked"] == 1
    added = set(new) - set(old)
    assert report["chunks"]["chunks_added"] == len(added) > 0
    assert report["chunks"]["chunks_removed"] == len(set(old) - set(new)) > 0
    # Only chunk texts never embedded before reach the model.
    expected = len({new[c] for c in added} - known_texts)
    assert report["embeddings"]["embedded_by_model"] == expected > 0
    assert expected < len(new) or len(new) == 1
    # Old chunks left every downstream table and the next index.
    gone = set(old) - set(new)
    for table in ("chunk_dedup", "embeddings", "quantized_embeddings"):
        assert not pipe.rows(f"SELECT 1 FROM {table} WHERE chunk_id IN (SELECT unnest(?::VARCHAR[]))", [list(gone)])
    index = pipe.run_index()
    assert index["build_mode"] == "incremental" and index["vectors_added"] == len(added) and index["vectors_removed"] == len(gone)
    assert index_ids(pipe) == live_vector_ids(pipe)
    assert any("Zugzwang drills" in h.text for h in pipe.search("zugzwang drills blindfold king and pawn", k=3))


def test_deleted_file_leaves_every_table_and_the_index(pipe):
    doc_vectors = {r[0] for r in pipe.rows("SELECT k.vector_id FROM chunks k JOIN documents d USING (doc_id) WHERE d.relative_path = 'chess-endgames.txt'")}
    assert doc_vectors & index_ids(pipe)
    (pipe.sources_root / "alpha" / "chess-endgames.txt").unlink()
    report = pipe.run_source("alpha")
    assert report["raw_documents"]["deleted"] == 1
    for table in ("documents", "cleaned_documents", "chunks"):
        assert not pipe.rows(f"SELECT 1 FROM {table} WHERE doc_id NOT IN (SELECT doc_id FROM documents)")
    for table in ("chunk_dedup", "embeddings", "quantized_embeddings"):
        assert not pipe.rows(f"SELECT 1 FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM chunks k WHERE k.chunk_id = t.chunk_id)")
    index = pipe.run_index()
    assert index["vectors_removed"] == len(doc_vectors)
    assert not (doc_vectors & index_ids(pipe))
    assert all(h.doc_path != "chess-endgames.txt" for h in pipe.search(CHESS_QUERY, k=10))


def test_duplicate_of_a_deleted_document_becomes_canonical(pipe):
    assert pipe.search(SOURDOUGH_QUERY, k=1)[0].doc_path == "sourdough-starter.md"
    copy_chunks = pipe.rows("SELECT count(*) FROM chunks k JOIN documents d USING (doc_id) WHERE d.relative_path = 'starter-notes.md'")[0][0]
    (pipe.sources_root / "alpha" / "sourdough-starter.md").unlink()
    report = pipe.run_source("alpha")
    assert report["deduped_chunks"]["redecided"] == copy_chunks
    # The copy's vectors come from the cache: same text, same model.
    assert report["embeddings"]["embedded_by_model"] == 0
    statuses = pipe.rows("SELECT DISTINCT x.status FROM chunks k JOIN documents d USING (doc_id) JOIN chunk_dedup x USING (chunk_id) WHERE d.relative_path = 'starter-notes.md'")
    assert statuses == [("canonical",)]
    pipe.run_index()
    assert index_ids(pipe) == live_vector_ids(pipe)
    top = pipe.search(SOURDOUGH_QUERY, k=1)[0]
    assert (top.source, top.doc_path) == ("beta", "starter-notes.md")


def test_rename_with_identical_content_embeds_nothing(pipe):
    (pipe.sources_root / "alpha" / "games").mkdir()
    (pipe.sources_root / "alpha" / "chess-endgames.txt").rename(pipe.sources_root / "alpha" / "games" / "endgames.txt")
    report = pipe.run_source("alpha")
    assert report["raw_documents"]["renamed"] == 1 and report["raw_documents"]["deleted"] == 1
    assert report["embeddings"]["embedded_by_model"] == 0
    pipe.run_index()
    assert pipe.search(CHESS_QUERY, k=1)[0].doc_path == "games/endgames.txt"


def test_empty_or_missing_source_needs_allow_empty(pipe):
    before = table_digest(pipe, "documents")
    for path in (pipe.sources_root / "beta").iterdir():
        path.unlink()
    with pytest.raises(RunFailed, match="has no supported documents.*allow_empty"):
        pipe.run_source("beta")
    shutil.rmtree(pipe.sources_root / "beta")
    with pytest.raises(RunFailed, match="does not exist"):
        pipe.run_source("beta")
    assert table_digest(pipe, "documents") == before  # nothing stored was lost
    report = pipe.run_source("beta", allow_empty=True)
    assert report["raw_documents"]["deleted"] == 4 and report["raw_documents"]["row_count"] == 0
    assert not pipe.rows("SELECT 1 FROM chunks WHERE source = 'beta'")
    pipe.run_index()
    assert index_ids(pipe) == live_vector_ids(pipe) and not live_vector_ids(pipe, "beta")


def test_chunking_settings_invalidate_chunks_not_cleaning(pipe):
    report = pipe.run_source("alpha", op_config={"chunks": {"chunk_tokens": 120, "overlap_tokens": 18, "min_chunk_tokens": 24}})
    assert report["cleaned_documents"]["cleaned"] == 0
    assert report["chunks"]["documents_chunked"] == 6
    assert report["chunks"]["max_token_count"] <= 120
    # Chunks whose text did not change keep their vectors from the cache. Duplicates in the other source
    # whose original was re-cut become canonical (redecided) and may need a vector of their own.
    assert report["embeddings"]["embedded_by_model"] <= report["chunks"]["chunks_added"] + report["deduped_chunks"]["redecided"]
    again = pipe.run_source("alpha", op_config={"chunks": {"chunk_tokens": 120, "overlap_tokens": 18, "min_chunk_tokens": 24}})
    assert again["chunks"]["documents_chunked"] == 0 and again["embeddings"]["embedded_by_model"] == 0


def test_cleaner_version_invalidates_cleaning_only_as_far_as_output_changes(pipe, monkeypatch):
    monkeypatch.setattr(cleaning, "CLEANER_VERSION", cleaning.CLEANER_VERSION + "-test")
    report = pipe.run_source("alpha")
    assert report["cleaned_documents"]["cleaned"] == 6
    # Same cleaned text -> same chunks -> nothing downstream.
    assert report["chunks"]["documents_chunked"] == 0
    assert report["embeddings"]["embedded_by_model"] == 0


def test_model_settings_invalidate_embeddings(pipe, tmp_path, instance):
    other = make_pipeline(tmp_path, instance, copy_corpus=False, max_seq_length=128, warehouse_url=pipe.warehouse.url)
    report = other.run_source("alpha")
    assert report["chunks"]["documents_chunked"] == 6  # the token limit is part of the chunking fingerprint
    live = report["embeddings"]["row_count"]
    assert report["embeddings"]["model_fingerprint"] != pipe.resources["model"].model_fingerprint()
    # Nothing is served from the other model's cache entries: every vector is new.
    assert report["embeddings"]["cache_hits_disk"] == report["embeddings"]["cache_hits_lru"] == 0
    assert report["embeddings"]["embedded_by_model"] >= live > 0
    # beta still holds vectors of the old model only: the index refuses to mix them.
    with pytest.raises(RunFailed, match="beta|exceed"):
        other.run_index()
    other.run_source("beta")
    assert other.run_index()["build_mode"] == "full"


def test_a_document_the_chunker_cannot_split_is_quarantined_not_fatal(pipe, monkeypatch):
    import embedding_assets.stages.chunks as chunk_stage
    from embedding_assets.core.chunking import ChunkingError

    real = chunk_stage.chunk_document

    def failing_for_chess(doc, tokenizer, settings, max_tokens):
        if "opposition" in doc.text:
            raise ChunkingError("could not split text into chunks of at most 10 tokens")
        return real(doc, tokenizer, settings, max_tokens)

    path = pipe.sources_root / "alpha" / "chess-endgames.txt"
    path.write_text(path.read_text() + "\n\nA new closing paragraph about the opposition.\n")
    (pipe.sources_root / "alpha" / "winter-beekeeping.md").write_text(
        (pipe.sources_root / "alpha" / "winter-beekeeping.md").read_text() + "\n\nCheck the hive weight in February.\n"
    )
    monkeypatch.setattr(chunk_stage, "chunk_document", failing_for_chess)
    report = pipe.run_source("alpha")
    assert report["chunks"]["documents_quarantined"] == 1 and report["chunks"]["documents_chunked"] == 1
    assert pipe.rows("SELECT relative_path, stage, reason FROM quarantine WHERE stage = 'chunks'") == [
        ("chess-endgames.txt", "chunks", "could not split text into chunks of at most 10 tokens")
    ]
    # The edited file's old chunks left with the content they came from; the other edit went through.
    assert not pipe.rows("SELECT 1 FROM chunks k JOIN documents d USING (doc_id) WHERE d.relative_path = 'chess-endgames.txt'")
    assert any("hive weight" in t for (t,) in pipe.rows("SELECT text FROM chunks"))
    pipe.run_index()
    assert index_ids(pipe) == live_vector_ids(pipe)

    monkeypatch.setattr(chunk_stage, "chunk_document", real)
    again = pipe.run_source("alpha")
    assert again["chunks"]["documents_chunked"] == 1 and again["chunks"]["documents_quarantined"] == 0
    assert not pipe.rows("SELECT 1 FROM quarantine WHERE stage = 'chunks'")


def test_invalid_chunking_settings_fail_before_touching_anything(pipe):
    before = table_digest(pipe, "chunks")
    with pytest.raises(RunFailed, match="chunk_tokens=0"):
        pipe.run_source("alpha", op_config={"chunks": {"chunk_tokens": 0}})
    assert table_digest(pipe, "chunks") == before
