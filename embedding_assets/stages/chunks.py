"""Stage 3, ``chunks``: structure-aware, token-measured chunks of each changed cleaned document.

A document is chunked again only when its cleaned text or the chunking fingerprint (settings,
tokenizer, token limit, contextual format) changed. Each row keeps the display ``text`` (a slice of the
document) apart from what the model reads: ``context`` (title and heading path) and ``embed_sha256``, the
hash of ``contextual_text(context, text)``, which is the embedding cache key and part of the chunk id.
Chunk ids come from that content (see ``core.identity``), so an edit to one paragraph keeps the ids of
every chunk whose embedded text did not change, and a renamed heading re-embeds the chunks under it.
``token_count`` counts the tokens the model reads (context included).
"""

from __future__ import annotations

import bisect
import json
import time
from dataclasses import dataclass

from embedding_assets.core.chunking import (
    ChunkingError,
    ChunkingSettings,
    chunk_document,
    chunking_fingerprint,
    contextual_text,
    validate_settings,
)
from embedding_assets.core.cleaning import Block, CleanedDocument
from embedding_assets.core.identity import chunk_id, text_sha256, vector_id
from embedding_assets.stages import ProgressFn, no_progress
from resources.warehouse import WarehouseResource, deleted_rows, insert_arrow, replace_quarantine

BATCH_DOCUMENTS = 64


@dataclass
class ChunkReport:
    source: str
    documents_chunked: int = 0
    documents_unchanged: int = 0
    quarantined: int = 0  # documents the chunker could not split (recorded in `quarantine`, stage "chunks")
    chunks_added: int = 0
    chunks_removed: int = 0
    chunks_unchanged: int = 0
    tokens: int = 0
    live_chunks: int = 0
    max_token_count: int = 0
    seconds: float = 0.0


def chunk_source(
    warehouse: WarehouseResource,
    source: str,
    *,
    tokenizer,
    tokenizer_fingerprint: str,
    max_tokens: int,
    settings: ChunkingSettings,
    progress: ProgressFn = no_progress,
) -> ChunkReport:
    started = time.perf_counter()
    report = ChunkReport(source=source)
    validate_settings(settings, max_tokens)  # a bad setting fails the run before any document is touched
    fp = chunking_fingerprint(settings, tokenizer_fingerprint, max_tokens)
    with warehouse.connect() as con:
        # Chunks of documents that are gone (deleted, or quarantined after an edit) leave now.
        report.chunks_removed += deleted_rows(
            con,
            """DELETE FROM chunks k WHERE k.source = ?
               AND NOT EXISTS (SELECT 1 FROM cleaned_documents c WHERE c.doc_id = k.doc_id)""",
            [source],
        )
        con.execute(
            """DELETE FROM chunked_documents m WHERE m.source = ?
               AND NOT EXISTS (SELECT 1 FROM cleaned_documents c WHERE c.doc_id = m.doc_id)""",
            [source],
        )
        pending = [
            row[0]
            for row in con.execute(
                """SELECT c.doc_id FROM cleaned_documents c JOIN documents d USING (doc_id)
                   WHERE c.source = ? AND NOT EXISTS (
                       SELECT 1 FROM chunked_documents m WHERE m.doc_id = c.doc_id
                       AND m.cleaned_sha256 = c.cleaned_sha256 AND m.chunking_fingerprint = ?)
                   ORDER BY d.relative_path""",
                [source, fp],
            ).fetchall()
        ]
        total = con.execute("SELECT count(*) FROM cleaned_documents WHERE source = ?", [source]).fetchone()[0]
    report.documents_unchanged = total - len(pending)

    for start in range(0, len(pending), BATCH_DOCUMENTS):
        ids = pending[start : start + BATCH_DOCUMENTS]
        docs = warehouse.query_rows(
            "SELECT c.doc_id, c.cleaned_sha256, c.text, c.blocks, c.title, c.language, d.relative_path, d.content_sha256 "
            "FROM cleaned_documents c JOIN documents d USING (doc_id) WHERE c.doc_id IN (SELECT unnest(?::VARCHAR[]))",
            [ids],
        )
        old = warehouse.query_rows(
            "SELECT doc_id, chunk_id FROM chunks WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
        )
        old_ids = {cid for _, cid in old}
        rows: dict[str, list] = {name: [] for name in _CHUNK_COLUMNS}
        marks: list[tuple[str, str, int]] = []
        failed: list[tuple[str, str, str, str]] = []
        for doc_id, cleaned_sha, text, blocks_json, title, language, rel_path, content_sha in docs:
            doc = CleanedDocument(
                text=text,
                blocks=tuple(_block(b) for b in json.loads(blocks_json)),
                title=title,
                language=language,
                warnings=(),
            )
            try:
                chunks = chunk_document(doc, tokenizer, settings, max_tokens)
            except ChunkingError as exc:  # one document's problem never fails the run
                failed.append((doc_id, rel_path, str(exc), content_sha))
                continue
            seen: dict[str, int] = {}
            block_ends = [b.end for b in doc.blocks]
            for chunk in chunks:
                th = text_sha256(chunk.text)
                eh = text_sha256(contextual_text(chunk.context, chunk.text))
                occurrence = seen.get(eh, 0)
                seen[eh] = occurrence + 1
                cid = chunk_id(doc_id, eh, occurrence)
                for name, value in (
                    ("chunk_id", cid),
                    ("vector_id", vector_id(cid)),
                    ("doc_id", doc_id),
                    ("source", source),
                    ("ordinal", chunk.ordinal),
                    ("text", chunk.text),
                    ("text_sha256", th),
                    ("start_char", chunk.start),
                    ("end_char", chunk.end),
                    ("heading_path", json.dumps(list(chunk.heading_path))),
                    ("token_count", chunk.embed_token_count),
                    ("context", chunk.context),
                    ("embed_sha256", eh),
                    ("page", _first_page(doc.blocks, block_ends, chunk.start)),
                ):
                    rows[name].append(value)
                report.tokens += chunk.embed_token_count
                report.max_token_count = max(report.max_token_count, chunk.embed_token_count)
            marks.append((doc_id, cleaned_sha, len(chunks)))
        new_ids = set(rows["chunk_id"])
        report.chunks_added += len(new_ids - old_ids)
        report.chunks_removed += len(old_ids - new_ids)
        report.documents_chunked += len(marks)
        with warehouse.connect() as con:
            con.execute("DELETE FROM chunks WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
            con.execute("DELETE FROM chunked_documents WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
            insert_arrow(con, "chunks", rows)
            # Retried on every run (settings may change); its old chunks are gone with the content they came from.
            replace_quarantine(con, "chunks", source, ids, failed)
            insert_arrow(
                con,
                "chunked_documents",
                {
                    "doc_id": [m[0] for m in marks],
                    "source": [source] * len(marks),
                    "cleaned_sha256": [m[1] for m in marks],
                    "chunking_fingerprint": [fp] * len(marks),
                    "chunk_count": [m[2] for m in marks],
                },
            )
        report.quarantined += len(failed)
        progress("chunks", min(start + BATCH_DOCUMENTS, len(pending)), len(pending), "documents")

    report.live_chunks, max_tokens_seen = warehouse.query_rows(
        "SELECT count(*), coalesce(max(token_count), 0) FROM chunks WHERE source = ?", [source]
    )[0]
    report.max_token_count = max(report.max_token_count, max_tokens_seen)
    report.chunks_unchanged = report.live_chunks - report.chunks_added
    report.seconds = time.perf_counter() - started
    return report


_CHUNK_COLUMNS = (
    "chunk_id", "vector_id", "doc_id", "source", "ordinal", "text", "text_sha256",
    "start_char", "end_char", "heading_path", "token_count", "page", "context", "embed_sha256",
)


def _first_page(blocks: tuple[Block, ...], block_ends: list[int], start: int) -> int | None:
    """Page of the block a chunk starts in (PDF), None for formats without pages."""
    index = bisect.bisect_right(block_ends, start)
    return blocks[index].page if index < len(blocks) else None


def _block(data: dict) -> Block:
    return Block(**{**data, "heading_path": tuple(data.get("heading_path", ()))})
