"""Stage 1, ``raw_documents``: the files of one source, stored with their content sha256.

A file counts as changed only when its content hash changes; a new mtime alone is no change.
Files proven absent (missing from a successful listing of their folder) are deleted here, which
every later stage then propagates. A file or folder that cannot be read (permissions, I/O error,
vanished between listing and reading) is reported in ``skipped`` and keeps its last stored
version: a read error never deletes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from embedding_assets.core.identity import document_id, sha256_hex
from embedding_assets.core.sources import (
    SkippedFile,
    SourceError,
    SourceMissing,
    SourceScan,
    absent_paths,
    is_under,
    read_document,
    scan_source,
)
from embedding_assets.stages import ProgressFn, no_progress
from resources.warehouse import WarehouseResource, insert_arrow

# Changed files are written in batches of about this many bytes, so memory stays bounded.
WRITE_BATCH_BYTES = 32 << 20


@dataclass
class RawReport:
    source: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    kept: int = 0  # stored documents kept at their last version because their path could not be read
    renamed: int = 0  # added paths whose content matches a deleted path's (no new work downstream)
    bytes_read: int = 0
    live_documents: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    seconds: float = 0.0


def ingest_source(
    warehouse: WarehouseResource,
    sources_root: Path,
    source: str,
    *,
    max_file_bytes: int,
    allow_empty: bool = False,
    progress: ProgressFn = no_progress,
) -> RawReport:
    """Bring the stored documents of ``source`` in line with its folder.

    Raises SourceError when the folder is missing or holds no document and ``allow_empty`` is
    False: an empty scan must never wipe a partition by accident. Also when the folder is refused or
    cannot be listed (even with ``allow_empty``: an unreadable folder is no empty folder), and when no
    file could be read while stored documents would be deleted. Stray paths and unreadable files or
    subfolders never raise: they are in ``report.skipped``, and unreadable ones keep their documents.
    """
    started = time.perf_counter()
    report = RawReport(source=source)
    try:
        scan = scan_source(sources_root, source, max_file_bytes=max_file_bytes)
    except SourceMissing:
        if not allow_empty:
            raise
        scan = SourceScan()
    files = scan.files
    if not files and not scan.unreadable and not allow_empty:
        raise SourceError(
            f"source {source!r} ({sources_root / source}) has no supported documents; refusing to delete its "
            f"{_count_stored(warehouse, source)} stored documents. Pass allow_empty (--allow-empty) to really empty it."
        )
    skipped = list(scan.skipped)
    unreadable = list(scan.unreadable)

    stored = {
        path: sha
        for path, sha in warehouse.query_rows(
            "SELECT relative_path, content_sha256 FROM documents WHERE source = ?", [source]
        )
    }
    now = datetime.now(timezone.utc)
    seen: set[str] = set()
    batch: list[tuple] = []
    batch_bytes = 0
    new_hashes: set[str] = set()

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        with warehouse.connect() as con:
            ids = [row[0] for row in batch]
            con.execute("DELETE FROM documents WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
            insert_arrow(
                con,
                "documents",
                {
                    "doc_id": ids,
                    "source": [source] * len(batch),
                    "relative_path": [row[1] for row in batch],
                    "suffix": [row[2] for row in batch],
                    "content_sha256": [row[3] for row in batch],
                    "size_bytes": [row[4] for row in batch],
                    "mtime_ns": [row[5] for row in batch],
                    "content": [row[6] for row in batch],
                    "first_seen": [now] * len(batch),
                    "updated_at": [now] * len(batch),
                },
            )
        batch, batch_bytes = [], 0

    for done, file in enumerate(files, 1):
        try:
            content = read_document(file, max_file_bytes)
        except OSError as exc:  # not proven absent: keep whatever is stored for it
            reason = "vanished during the scan" if isinstance(exc, FileNotFoundError) else f"unreadable: {exc.strerror or exc}"
            skipped.append(SkippedFile(file.relative_path, reason, keeps_stored=True))
            unreadable.append(file.relative_path)
            progress("raw_documents", done, len(files), "files")
            continue
        seen.add(file.relative_path)
        report.bytes_read += len(content)
        sha = sha256_hex(content)
        old = stored.get(file.relative_path)
        if old == sha:
            report.unchanged += 1
        else:
            if old is None:
                report.added += 1
                new_hashes.add(sha)
            else:
                report.updated += 1
            batch.append(
                (document_id(source, file.relative_path), file.relative_path, file.suffix, sha, len(content), file.mtime_ns, content)
            )
            batch_bytes += len(content)
            if batch_bytes >= WRITE_BATCH_BYTES:
                flush()
        progress("raw_documents", done, len(files), "files")
    flush()

    gone = absent_paths(stored, seen, unreadable)
    if not seen and gone and not allow_empty:
        raise SourceError(
            f"source {source!r} ({sources_root / source}): no file could be read ({len(unreadable)} unreadable) and "
            f"{len(gone)} stored documents are missing; refusing to delete them. Fix the permissions and run again, "
            "or pass allow_empty (--allow-empty) to really delete them."
        )
    report.skipped = _with_kept_counts(skipped, stored)
    gone_set = set(gone)
    report.kept = sum(1 for path in stored if path not in seen and path not in gone_set)
    if gone:
        gone_hashes = {stored[path] for path in gone}
        report.renamed = len(new_hashes & gone_hashes)
        with warehouse.connect() as con:
            con.execute(
                "DELETE FROM documents WHERE source = ? AND relative_path IN (SELECT unnest(?::VARCHAR[]))",
                [source, gone],
            )
    report.deleted = len(gone)
    stored_skips = set(warehouse.query_rows("SELECT relative_path, reason FROM skipped_files WHERE source = ?", [source]))
    skips_changed = stored_skips != {(s.relative_path, s.reason) for s in report.skipped}
    with warehouse.connect() as con:
        if skips_changed:
            con.execute("DELETE FROM skipped_files WHERE source = ?", [source])
        if skips_changed and report.skipped:
            insert_arrow(
                con,
                "skipped_files",
                {
                    "source": [source] * len(report.skipped),
                    "relative_path": [s.relative_path for s in report.skipped],
                    "reason": [s.reason for s in report.skipped],
                    "recorded_at": [now] * len(report.skipped),
                },
            )
        report.live_documents = con.execute("SELECT count(*) FROM documents WHERE source = ?", [source]).fetchone()[0]
    report.seconds = time.perf_counter() - started
    return report


def _with_kept_counts(skipped: list[SkippedFile], stored: dict[str, str]) -> list[SkippedFile]:
    """Read errors name what they keep, so a reader of the report knows nothing was deleted."""
    out = []
    for entry in skipped:
        if entry.keeps_stored:
            if entry.relative_path in stored:
                entry = SkippedFile(entry.relative_path, f"{entry.reason}; kept its last stored version", True)
            elif kept := sum(1 for path in stored if is_under(path, entry.relative_path)):
                entry = SkippedFile(entry.relative_path, f"{entry.reason}; kept its {kept} stored documents", True)
        out.append(entry)
    return sorted(out, key=lambda s: s.relative_path)


def _count_stored(warehouse: WarehouseResource, source: str) -> int:
    return warehouse.query_rows("SELECT count(*) FROM documents WHERE source = ?", [source])[0][0]
