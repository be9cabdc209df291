"""Stage 2, ``cleaned_documents``: text and structure extracted from each changed document.

A document is cleaned again only when its content hash or the cleaner's fingerprint changed.
A document that yields no text goes to the ``quarantine`` table with the reason; the run goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from embedding_assets.core.cleaning import CleaningError, clean_document, cleaning_fingerprint
from embedding_assets.core.identity import sha256_hex
from embedding_assets.stages import ProgressFn, no_progress
from resources.warehouse import WarehouseResource, deleted_rows, insert_arrow, replace_quarantine

BATCH_DOCUMENTS = 64


@dataclass
class CleanReport:
    source: str
    cleaned: int = 0
    unchanged: int = 0
    stale_removed: int = 0  # rows of changed or deleted documents dropped before re-cleaning
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (relative_path, reason)
    warnings: int = 0
    characters: int = 0
    languages: dict[str, int] = field(default_factory=dict)
    live_documents: int = 0
    seconds: float = 0.0


def clean_source(warehouse: WarehouseResource, source: str, *, progress: ProgressFn = no_progress) -> CleanReport:
    started = time.perf_counter()
    report = CleanReport(source=source)
    fp = cleaning_fingerprint()
    with warehouse.connect() as con:
        # Rows whose document is gone or changed, under any fingerprint, are stale.
        report.stale_removed = _delete_stale(con, source)
        pending = [
            row[0]
            for row in con.execute(
                """SELECT d.doc_id FROM documents d
                   WHERE d.source = ?
                     AND NOT EXISTS (SELECT 1 FROM cleaned_documents c WHERE c.doc_id = d.doc_id
                                     AND c.content_sha256 = d.content_sha256 AND c.cleaning_fingerprint = ?)
                     AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.doc_id = d.doc_id AND q.stage = 'cleaned_documents'
                                     AND q.content_sha256 = d.content_sha256)
                   ORDER BY d.relative_path""",
                [source, fp],
            ).fetchall()
        ]
        total = con.execute("SELECT count(*) FROM documents WHERE source = ?", [source]).fetchone()[0]
    report.unchanged = total - len(pending)

    for start in range(0, len(pending), BATCH_DOCUMENTS):
        ids = pending[start : start + BATCH_DOCUMENTS]
        docs = warehouse.query_rows(
            "SELECT doc_id, relative_path, suffix, content_sha256, content FROM documents "
            "WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))",
            [ids],
        )
        rows: list[dict] = []
        bad: list[tuple[str, str, str, str]] = []
        for doc_id, rel, suffix, sha, content in docs:
            try:
                cleaned = clean_document(bytes(content), suffix)
            except CleaningError as exc:
                bad.append((doc_id, rel, str(exc), sha))
                continue
            report.cleaned += 1
            report.warnings += len(cleaned.warnings)
            report.characters += len(cleaned.text)
            report.languages[cleaned.language] = report.languages.get(cleaned.language, 0) + 1
            rows.append(
                {
                    "doc_id": doc_id,
                    "source": source,
                    "content_sha256": sha,
                    "cleaning_fingerprint": fp,
                    "cleaned_sha256": sha256_hex(cleaned.text),
                    "text": cleaned.text,
                    "blocks": json.dumps([asdict(b) for b in cleaned.blocks]),
                    "title": cleaned.title,
                    "language": cleaned.language,
                    "warnings": json.dumps(list(cleaned.warnings)),
                    "char_count": len(cleaned.text),
                }
            )
        with warehouse.connect() as con:
            touched = [r["doc_id"] for r in rows] + [b[0] for b in bad]
            con.execute("DELETE FROM cleaned_documents WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [touched])
            if rows:
                insert_arrow(con, "cleaned_documents", {k: [r[k] for r in rows] for k in rows[0]})
            replace_quarantine(con, "cleaned_documents", source, touched, bad)
        progress("cleaned_documents", min(start + BATCH_DOCUMENTS, len(pending)), len(pending), "documents")

    report.quarantined = [
        (rel, reason)
        for rel, reason in warehouse.query_rows(
            "SELECT relative_path, reason FROM quarantine WHERE source = ? ORDER BY relative_path", [source]
        )
    ]
    report.live_documents = warehouse.query_rows(
        "SELECT count(*) FROM cleaned_documents WHERE source = ?", [source]
    )[0][0]
    report.seconds = time.perf_counter() - started
    return report


def _delete_stale(con, source: str) -> int:
    stale = deleted_rows(
        con,
        """DELETE FROM cleaned_documents c WHERE c.source = ? AND NOT EXISTS
           (SELECT 1 FROM documents d WHERE d.doc_id = c.doc_id AND d.content_sha256 = c.content_sha256)""",
        [source],
    )
    con.execute(
        """DELETE FROM quarantine q WHERE q.source = ? AND NOT EXISTS
           (SELECT 1 FROM documents d WHERE d.doc_id = q.doc_id AND d.content_sha256 = q.content_sha256)""",
        [source],
    )
    return stale
