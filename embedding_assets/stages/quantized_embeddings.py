"""Stage 6, ``quantized_embeddings``: int8 and binary codes of the float32 vectors.

int8 needs per-dimension ranges. They are computed per model fingerprint from a corpus sample,
stored in ``quantization_ranges`` and reused for every batch and partition afterwards, so a vector
gets the same code whichever batch it arrives in (sentence-transformers #2865, #2837).

A sample of a young corpus is small, and min/max over a few vectors would squeeze every later vector
into a handful of buckets. Two rules keep the codes useful: each dimension's range is at least
``±3/sqrt(dim)`` around its centre (the spread of a coordinate of a random unit vector), and while the
sample is below ``CALIBRATION_SAMPLE`` the ranges are computed again once the corpus has grown 4x past
the sample they came from — then every code of the model is made again from the new ranges (the index
sees new ranges and is rebuilt in full). Past ``CALIBRATION_SAMPLE`` the ranges never change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from embedding_assets.core.quantization import (
    bytes_per_vector,
    calibration_ranges,
    quantize_binary,
    quantize_int8,
    ranges_from_bytes,
    ranges_to_bytes,
)
from embedding_assets.stages import ProgressFn, no_progress
from resources.warehouse import WarehouseResource, arrow_to_vectors, deleted_rows, insert_arrow

BATCH_VECTORS = 4096
CALIBRATION_SAMPLE = 10_000
RECALIBRATE_GROWTH = 4  # recalibrate a small sample once the corpus is this many times larger


@dataclass
class QuantizeReport:
    source: str
    quantized: int = 0
    removed: int = 0
    calibration_sample_size: int = 0
    calibrated_now: bool = False
    bytes_per_vector: dict[str, int] = field(default_factory=dict)
    live_codes: int = 0
    seconds: float = 0.0


def quantize_source(
    warehouse: WarehouseResource, source: str, *, model_fingerprint: str, progress: ProgressFn = no_progress
) -> QuantizeReport:
    started = time.perf_counter()
    report = QuantizeReport(source=source)
    with warehouse.connect() as con:
        ranges, report.calibration_sample_size, report.calibrated_now = _ranges(con, model_fingerprint)
        report.removed = deleted_rows(
            con,
            """DELETE FROM quantized_embeddings q WHERE NOT EXISTS (SELECT 1 FROM embeddings e
               WHERE e.chunk_id = q.chunk_id AND e.model_fingerprint = q.model_fingerprint)""",
        )
        if ranges is not None:
            pending = [
                row[0]
                for row in con.execute(
                    """SELECT e.chunk_id FROM embeddings e WHERE e.model_fingerprint = ?
                       AND NOT EXISTS (SELECT 1 FROM quantized_embeddings q WHERE q.chunk_id = e.chunk_id
                                       AND q.model_fingerprint = e.model_fingerprint)
                       ORDER BY e.chunk_id""",
                    [model_fingerprint],
                ).fetchall()
            ]
            for start in range(0, len(pending), BATCH_VECTORS):
                ids = pending[start : start + BATCH_VECTORS]
                table = con.fetch_arrow(
                    "SELECT chunk_id, vector_id, source, vector FROM embeddings WHERE model_fingerprint = ? "
                    "AND chunk_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY chunk_id",
                    [model_fingerprint, ids],
                )
                vectors = arrow_to_vectors(table.column("vector"))
                int8 = quantize_int8(vectors, ranges)
                binary = quantize_binary(vectors)
                insert_arrow(
                    con,
                    "quantized_embeddings",
                    {
                        "chunk_id": table.column("chunk_id"),
                        "vector_id": table.column("vector_id"),
                        "source": table.column("source"),
                        "model_fingerprint": [model_fingerprint] * len(vectors),
                        "int8": [row.tobytes() for row in int8],
                        "ubinary": [row.tobytes() for row in binary],
                    },
                )
                report.quantized += len(vectors)
                progress("quantized_embeddings", min(start + BATCH_VECTORS, len(pending)), len(pending), "vectors")
            report.bytes_per_vector = bytes_per_vector(ranges.shape[1])
        report.live_codes = con.execute(
            "SELECT count(*) FROM quantized_embeddings WHERE source = ? AND model_fingerprint = ?",
            [source, model_fingerprint],
        ).fetchone()[0]
    report.seconds = time.perf_counter() - started
    return report


def load_ranges(warehouse: WarehouseResource, model_fingerprint: str) -> np.ndarray | None:
    rows = warehouse.query_rows(
        "SELECT ranges, dim FROM quantization_ranges WHERE model_fingerprint = ?", [model_fingerprint]
    )
    return ranges_from_bytes(bytes(rows[0][0]), rows[0][1]) if rows else None


def _ranges(con, model_fingerprint: str) -> tuple[np.ndarray | None, int, bool]:
    rows = con.execute(
        "SELECT ranges, dim, sample_size FROM quantization_ranges WHERE model_fingerprint = ?", [model_fingerprint]
    ).fetchall()
    available = con.execute("SELECT count(*) FROM embeddings WHERE model_fingerprint = ?", [model_fingerprint]).fetchall()[0][0]
    if rows:
        ranges, sample_size = ranges_from_bytes(bytes(rows[0][0]), rows[0][1]), rows[0][2]
        if sample_size >= CALIBRATION_SAMPLE or available < RECALIBRATE_GROWTH * max(sample_size, 1):
            return ranges, sample_size, False
        # The corpus outgrew the small sample: new ranges, and every code made from the old ones goes.
        con.execute("DELETE FROM quantization_ranges WHERE model_fingerprint = ?", [model_fingerprint])
        con.execute("DELETE FROM quantized_embeddings WHERE model_fingerprint = ?", [model_fingerprint])
    # Deterministic sample: the vectors with the smallest ids are a hash-random slice of the corpus.
    table = con.fetch_arrow(
        "SELECT vector FROM embeddings WHERE model_fingerprint = ? ORDER BY vector_id LIMIT ?",
        [model_fingerprint, CALIBRATION_SAMPLE],
    )
    if table.num_rows == 0:
        return None, 0, False
    sample = arrow_to_vectors(table.column("vector"))
    ranges = calibration_ranges(sample, min_half_width=3.0 / np.sqrt(sample.shape[1]))
    insert_arrow(
        con,
        "quantization_ranges",
        {
            "model_fingerprint": [model_fingerprint],
            "ranges": [ranges_to_bytes(ranges)],
            "dim": [ranges.shape[1]],
            "sample_size": [len(sample)],
            "created_at": [datetime.now(timezone.utc)],
        },
    )
    return ranges, len(sample), True
