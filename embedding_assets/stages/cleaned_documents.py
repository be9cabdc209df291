"""Stage 2, ``cleaned_documents``: text and structure extracted from each changed document.

A document is cleaned again only when its content hash or its format's cleaning fingerprint changed
(``core.cleaning.cleaning_fingerprint(suffix)``: a change to one format re-cleans only that format).
A document that yields no text, or whose cleaning takes longer than the per-document time budget
(``EMBEDDING_CLEAN_SECONDS_PER_DOCUMENT``), goes to the ``quarantine`` table with the reason; the
run goes on.

The budget is enforced by cleaning in a worker process that is killed when a document overruns it:
a parser stuck inside C code (a regular expression, lxml, lexbor) cannot be interrupted from Python
in the same process. Workers (``EMBEDDING_CLEAN_WORKERS``, default one per core) are started once per
process and reused, each cleaning its own documents; a budget of 0 cleans in this process without a limit.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from embedding_assets.core.cleaning import CleanedDocument, CleaningError, clean_document, cleaning_fingerprints
from embedding_assets.core.identity import sha256_hex
from embedding_assets.stages import ProgressFn, no_progress
from resources.warehouse import WarehouseResource, deleted_rows, insert_arrow, replace_quarantine

BATCH_DOCUMENTS = 64
DEFAULT_SECONDS_PER_DOCUMENT = 30.0
# Starting a worker imports the parsers and loads the language model: not part of any document's budget.
_WORKER_START_SECONDS = 120.0


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


def seconds_per_document_setting() -> float:
    """``EMBEDDING_CLEAN_SECONDS_PER_DOCUMENT`` (default 30; 0 = no budget, clean in-process)."""
    from embedding_assets.settings import SettingError, env_float

    value = env_float("EMBEDDING_CLEAN_SECONDS_PER_DOCUMENT", DEFAULT_SECONDS_PER_DOCUMENT)
    if value < 0:
        raise SettingError(f"EMBEDDING_CLEAN_SECONDS_PER_DOCUMENT={value} must be >= 0 (0 disables the budget)")
    return value


def clean_source(
    warehouse: WarehouseResource,
    source: str,
    *,
    seconds_per_document: float | None = None,
    progress: ProgressFn = no_progress,
) -> CleanReport:
    """Clean the documents of ``source`` that changed; ``seconds_per_document`` defaults to the setting."""
    started = time.perf_counter()
    report = CleanReport(source=source)
    budget = seconds_per_document_setting() if seconds_per_document is None else seconds_per_document
    fps = cleaning_fingerprints()
    suffixes = sorted(fps)
    with warehouse.connect() as con:
        # Rows whose document is gone or changed, under any fingerprint, are stale.
        report.stale_removed = _delete_stale(con, source)
        candidates = con.execute(
            """WITH fp AS (SELECT unnest(?::VARCHAR[]) AS suffix, unnest(?::VARCHAR[]) AS fingerprint)
               SELECT d.doc_id, q.reason FROM documents d LEFT JOIN fp ON fp.suffix = d.suffix
               LEFT JOIN quarantine q ON q.doc_id = d.doc_id AND q.stage = 'cleaned_documents'
                                     AND q.content_sha256 = d.content_sha256
               WHERE d.source = ?
                 AND NOT EXISTS (SELECT 1 FROM cleaned_documents c WHERE c.doc_id = d.doc_id
                                 AND c.content_sha256 = d.content_sha256 AND c.cleaning_fingerprint = fp.fingerprint)
               ORDER BY d.relative_path""",
            [suffixes, [fps[x] for x in suffixes], source],
        ).fetchall()
        pending = _to_clean(candidates, budget)
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
        outcomes = _clean_all([(bytes(content), suffix) for _, _, suffix, _, content in docs], budget)
        for (doc_id, rel, suffix, sha, _), cleaned in zip(docs, outcomes):
            if isinstance(cleaned, CleaningError):
                bad.append((doc_id, rel, str(cleaned), sha))
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
                    "cleaning_fingerprint": fps[suffix],
                    "cleaned_sha256": sha256_hex(cleaned.text),
                    "text": cleaned.text,
                    "blocks": _blocks_json(cleaned.blocks),
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


# The reason a document over the time budget was quarantined with (see ``_Worker.clean``).
_OVER_BUDGET = re.compile(r"^cleaning took longer than ([0-9.e+-]+) s")


def _to_clean(candidates: list[tuple[str, str | None]], budget: float) -> list[str]:
    """Doc ids to clean, in order, from (doc_id, quarantine reason of its current content or None).

    A quarantined document is not tried again, except one that was over the time budget when the
    budget has been raised past what it took (a budget of 0 means none).
    """
    limit = budget if budget > 0 else float("inf")
    out: dict[str, None] = {}
    for doc_id, reason in candidates:
        if reason is not None:
            over = _OVER_BUDGET.match(reason)
            if over is None or float(over.group(1)) >= limit:
                continue
        out[doc_id] = None
    return list(out)


def _blocks_json(blocks) -> str:
    """The blocks column: one object per block with the ``Block`` fields (``dataclasses.asdict`` deep-copies
    every value and was a third of this stage's time)."""
    return json.dumps(
        [
            {"kind": b.kind, "start": b.start, "end": b.end, "level": b.level, "heading_path": b.heading_path, "page": b.page}
            for b in blocks
        ]
    )


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


# ---------------------------------------------------------------------------------------------
# The per-document time budget
# ---------------------------------------------------------------------------------------------


def clean_workers_setting() -> int:
    """``EMBEDDING_CLEAN_WORKERS``: cleaning worker processes (default 0 = one per core, at most 4)."""
    from embedding_assets.settings import SettingError, env_int

    value = env_int("EMBEDDING_CLEAN_WORKERS", 0)
    if value < 0:
        raise SettingError(f"EMBEDDING_CLEAN_WORKERS={value} must be >= 0 (0 = one per core)")
    return value or max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _clean_all(items: list[tuple[bytes, str]], budget: float) -> list[CleanedDocument | CleaningError]:
    """Each (data, suffix) cleaned, in order: a CleanedDocument or the CleaningError that quarantines it.

    With a budget the documents are shared among the pool's worker processes (each document still has
    its own budget, in its own worker); without one they are cleaned here, one after the other.
    """
    if budget <= 0:
        return [_outcome(clean_document, data, suffix) for data, suffix in items]
    workers = _POOL.take(min(clean_workers_setting(), len(items)))
    try:
        if len(workers) == 1:
            return [_outcome(workers[0].clean, data, suffix, budget) for data, suffix in items]
        free: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in workers:
            free.put(worker)

        def one(item: tuple[bytes, str]) -> CleanedDocument | CleaningError:
            worker = free.get()
            try:
                return _outcome(worker.clean, item[0], item[1], budget)
            finally:
                free.put(worker)

        with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="clean") as threads:
            return list(threads.map(one, items))
    finally:
        _POOL.give_back(workers)


def _outcome(fn, *args) -> CleanedDocument | CleaningError:
    try:
        return fn(*args)
    except CleaningError as exc:
        return exc


class _Pool:
    """Idle workers kept across batches and runs of this process; a caller takes some and gives them back
    (two stages cleaning at once in one process each get their own)."""

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> list[_Worker]:
        with self._lock:
            taken, self._idle = self._idle[:n], self._idle[n:]
        return taken + [_Worker() for _ in range(max(1, n) - len(taken))]

    def give_back(self, workers: list[_Worker]) -> None:
        with self._lock:
            self._idle.extend(workers)

    def stop(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.stop()


class _Worker:
    """One worker process (``core.formats.worker``), started on first use, reused across documents
    and runs of this process, replaced after it is killed or dies."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._answers: Connection | None = None

    def _start(self) -> None:
        # The child imports exactly what this process imports (same interpreter, same sys.path).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = subprocess.Popen(
            [sys.executable, "-m", "embedding_assets.core.formats.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        self._process = process
        self._requests = Connection(os.dup(process.stdin.fileno()))
        self._answers = Connection(os.dup(process.stdout.fileno()))
        process.stdin.close()
        process.stdout.close()
        if not self._answers.poll(_WORKER_START_SECONDS):
            self.stop()
            raise RuntimeError(f"the cleaning worker did not start within {_WORKER_START_SECONDS:g} s")
        try:
            self._answers.recv()
        except EOFError:
            code = process.wait()
            self.stop()
            raise RuntimeError(f"the cleaning worker exited at start (exit code {code}); see its stderr") from None

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(5)
            self._requests.close()
            self._answers.close()
        self._process = self._requests = self._answers = None

    def clean(self, data: bytes, suffix: str, budget: float) -> CleanedDocument:
        if self._process is None or self._process.poll() is not None:
            self.stop()
            self._start()
        try:
            self._requests.send((data, suffix))
            ready = self._answers.poll(budget)
        except (BrokenPipeError, OSError):
            ready = True  # the worker died: recv below reports it
        if not ready:
            self.stop()  # the only way to stop a parser stuck in C code
            raise CleaningError(
                f"cleaning took longer than {budget:g} s; raise EMBEDDING_CLEAN_SECONDS_PER_DOCUMENT to index it"
            )
        try:
            status, value = self._answers.recv()
        except (EOFError, OSError):
            code = self._process.wait(5) if self._process is not None else None
            self.stop()
            raise CleaningError(f"the {suffix} parser crashed on this document (worker exit code {code})") from None
        if status == "error":
            raise CleaningError(value)
        return value


_POOL = _Pool()
atexit.register(_POOL.stop)
