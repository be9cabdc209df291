"""Stage 4, ``deduped_chunks``: exact and near duplicates removed across ALL partitions.

Each live chunk gets one decision: ``canonical``, ``exact_duplicate`` (same normalized-text hash as
a canonical chunk) or ``near_duplicate`` (MinHash Jaccard >= threshold, LSH candidates found through
the ``minhash_bands`` table, so the check covers the whole corpus without an in-memory index).
A duplicate records ``duplicate_of``. The first chunk to be decided stays canonical; when a canonical
chunk disappears, the chunks that pointed at it are decided again, so content that is still live
never silently drops out of search.

Decisions are made under the warehouse write lock, so two partitions never both keep the same text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from embedding_assets.core.dedup import (
    MinHashSettings,
    band_keys,
    dedup_fingerprint,
    estimated_jaccard,
    find_near_duplicates_within,
    lsh_bands,
    minhash_signatures,
    signature_from_bytes,
    signature_to_bytes,
)
from embedding_assets.stages import ProgressFn, no_progress
from resources.warehouse import WarehouseResource, insert_arrow

BATCH_CHUNKS = 2000


@dataclass
class DedupReport:
    source: str
    decided: int = 0
    canonical: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    redecided: int = 0  # chunks whose canonical copy disappeared, decided again
    decisions_removed: int = 0
    live_chunks: int = 0
    live_canonical: int = 0
    seconds: float = 0.0

    @property
    def dedup_ratio(self) -> float:
        """Share of this source's live chunks that are duplicates."""
        return 0.0 if not self.live_chunks else 1.0 - self.live_canonical / self.live_chunks


def dedup_source(
    warehouse: WarehouseResource,
    source: str,
    *,
    settings: MinHashSettings,
    progress: ProgressFn = no_progress,
) -> DedupReport:
    started = time.perf_counter()
    report = DedupReport(source=source)
    fp = dedup_fingerprint(settings)
    with warehouse.connect() as con:
        report.decisions_removed, report.redecided = _drop_stale_decisions(con, fp)
        pending = con.execute(
            """SELECT k.chunk_id, k.text, k.text_sha256, k.source FROM chunks k JOIN documents d USING (doc_id)
               WHERE NOT EXISTS (SELECT 1 FROM chunk_dedup x WHERE x.chunk_id = k.chunk_id)
               ORDER BY k.source = ? DESC, k.source, d.relative_path, k.ordinal""",
            [source],
        ).fetchall()
        # Asked only when there is work: datasketch pulls in scipy (~1.5 s of an unchanged re-run).
        bands, rows = lsh_bands(settings) if pending else (0, 0)
        for start in range(0, len(pending), BATCH_CHUNKS):
            _decide_batch(con, pending[start : start + BATCH_CHUNKS], source, fp, settings, bands, rows, report)
            progress("deduped_chunks", min(start + BATCH_CHUNKS, len(pending)), len(pending), "chunks")
        report.live_chunks, report.live_canonical = con.execute(
            """SELECT count(*), count(*) FILTER (WHERE x.status = 'canonical')
               FROM chunks k JOIN chunk_dedup x USING (chunk_id) WHERE k.source = ?""",
            [source],
        ).fetchone()
    report.seconds = time.perf_counter() - started
    return report


def _drop_stale_decisions(con, fp: str) -> tuple[int, int]:
    """Forget decisions of vanished chunks or other settings, and of chunks that pointed at them."""
    con.execute("CREATE TEMP TABLE gone AS SELECT chunk_id FROM chunk_dedup x WHERE x.dedup_fingerprint <> ? "
                "OR NOT EXISTS (SELECT 1 FROM chunks k WHERE k.chunk_id = x.chunk_id)", [fp])
    con.execute("CREATE TEMP TABLE orphaned AS SELECT chunk_id FROM chunk_dedup WHERE duplicate_of IN "
                "(SELECT chunk_id FROM gone) AND chunk_id NOT IN (SELECT chunk_id FROM gone)")
    removed = con.execute("SELECT count(*) FROM gone").fetchone()[0]
    orphaned = con.execute("SELECT count(*) FROM orphaned").fetchone()[0]
    for table in ("chunk_dedup", "minhash_bands", "minhash_signatures"):
        con.execute(f"DELETE FROM {table} WHERE chunk_id IN (SELECT chunk_id FROM gone UNION ALL SELECT chunk_id FROM orphaned)")  # noqa: S608 - table names are constants of this loop; values are parameters
    con.execute("DROP TABLE gone")
    con.execute("DROP TABLE orphaned")
    return removed, orphaned


def _decide_batch(con, batch, decided_in: str, fp: str, settings: MinHashSettings, bands: int, rows: int, report: DedupReport) -> None:
    ids = [row[0] for row in batch]
    texts = [row[1] for row in batch]
    hashes = [row[2] for row in batch]
    existing = dict(
        con.execute(
            "SELECT text_sha256, min(chunk_id) FROM chunk_dedup WHERE status = 'canonical' "
            "AND text_sha256 IN (SELECT unnest(?::VARCHAR[])) GROUP BY text_sha256",
            [sorted(set(hashes))],
        ).fetchall()
    )
    status: list[str | None] = [None] * len(batch)
    duplicate_of: list[str | None] = [None] * len(batch)
    similarity: list[float | None] = [None] * len(batch)
    first_in_batch: dict[str, str] = {}
    for i, h in enumerate(hashes):
        target = existing.get(h) or first_in_batch.get(h)
        if target is not None:
            status[i], duplicate_of[i], similarity[i] = "exact_duplicate", target, 1.0
        else:
            first_in_batch[h] = ids[i]

    open_rows = [i for i in range(len(batch)) if status[i] is None]
    signatures = minhash_signatures([texts[i] for i in open_rows], settings)
    keys = band_keys(signatures, bands, rows)
    corpus_match = _match_against_corpus(con, signatures, keys, settings)
    within = find_near_duplicates_within(signatures, settings)
    for j, i in enumerate(open_rows):
        if corpus_match[j] is not None:
            status[i], duplicate_of[i], similarity[i] = "near_duplicate", *corpus_match[j]
        elif within[j] is not None:
            earlier = open_rows[within[j]]
            target = ids[earlier] if status[earlier] == "canonical" else duplicate_of[earlier]
            sim = float(estimated_jaccard(signatures[j], signatures[within[j]]))
            status[i], duplicate_of[i], similarity[i] = "near_duplicate", target, sim
        else:
            status[i] = "canonical"

    insert_arrow(
        con,
        "chunk_dedup",
        {
            "chunk_id": ids,
            "source": [row[3] for row in batch],
            "text_sha256": hashes,
            "status": status,
            "duplicate_of": duplicate_of,
            "similarity": similarity,
            "dedup_fingerprint": [fp] * len(batch),
            "decided_in": [decided_in] * len(batch),
        },
    )
    kept = [j for j, i in enumerate(open_rows) if status[i] == "canonical"]
    insert_arrow(
        con,
        "minhash_signatures",
        {"chunk_id": [ids[open_rows[j]] for j in kept], "signature": [signature_to_bytes(signatures[j]) for j in kept]},
    )
    insert_arrow(
        con,
        "minhash_bands",
        {
            "chunk_id": [ids[open_rows[j]] for j in kept for _ in range(bands)],
            "band": [b for _ in kept for b in range(bands)],
            "band_key": keys[kept].reshape(-1) if kept else np.zeros(0, dtype=np.int64),
        },
    )
    report.decided += len(batch)
    report.canonical += status.count("canonical")
    report.exact_duplicates += status.count("exact_duplicate")
    report.near_duplicates += status.count("near_duplicate")


def _match_against_corpus(con, signatures: np.ndarray, keys: np.ndarray, settings: MinHashSettings):
    """For each row: (canonical chunk id, similarity) of its best near duplicate already stored, or None."""
    result: list[tuple[str, float] | None] = [None] * len(signatures)
    if not len(signatures):
        return result
    n, bands = keys.shape
    probe = {"probe_row": np.repeat(np.arange(n), bands), "band_key": keys.reshape(-1)}
    with con.scratch_table("_probe", probe, {"probe_row": "BIGINT", "band_key": "BIGINT"}):
        pairs = con.execute(
            """SELECT DISTINCT p.probe_row, b.chunk_id FROM _probe p JOIN minhash_bands b ON b.band_key = p.band_key"""
        ).fetchall()
    if not pairs:
        return result
    candidate_ids = sorted({cid for _, cid in pairs})
    stored = {
        cid: signature_from_bytes(bytes(blob), settings.num_perm)
        for cid, blob in con.execute(
            "SELECT chunk_id, signature FROM minhash_signatures WHERE chunk_id IN (SELECT unnest(?::VARCHAR[]))",
            [candidate_ids],
        ).fetchall()
    }
    by_row: dict[int, list[str]] = {}
    for row, cid in pairs:
        if cid in stored:
            by_row.setdefault(row, []).append(cid)
    for row, cids in by_row.items():
        cids.sort()
        sims = estimated_jaccard(signatures[row], np.stack([stored[c] for c in cids]))
        best = int(np.argmax(sims))
        if sims[best] >= settings.threshold:
            result[row] = (cids[best], float(sims[best]))
    return result
