"""Quality gates of the index: the asset checks of ``faiss_index``.

Publishing happens inside the ``faiss_index`` asset, so a separate check step would run after a bad
index was already current. The gates therefore run inside the build, on the build's own snapshot of the
live set (never on the live tables, which may have moved on), in two places:

- before building (:func:`snapshot_gates`): vectors have the model's dimension, are finite and unit-norm,
  codes have their widths; no empty chunk; no chunk over the model's token limit;
- after building and before the atomic publish (:func:`index_gates`): recall@10 of the new version against
  exact float32 search reaches the target, and the version holds exactly one vector per snapshot row.

A failed blocking gate is reported as a failed, blocking ``AssetCheckResult`` and the step fails before
``publish``; the previous version stays current. Warnings (:func:`warning_checks`: dedup ratio jump,
share of quarantined/skipped documents, language mix) never stop anything; they are WARN results.

The gate functions take plain values; only the last section touches Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

from resources.warehouse import WarehouseResource

ASSET = "faiss_index"
UNIT_NORM_TOLERANCE = 1e-3  # |v.v - 1|; float32 normalization leaves ~1e-7, bf16 encoders ~1e-3 before renorm

BLOCKING_GATES: dict[str, str] = {
    "vectors_have_model_dimension": "Every live canonical vector has the model's dimension.",
    "vectors_are_finite": "No vector holds NaN or infinity.",
    "vectors_are_unit_norm": f"Every vector has L2 norm 1 (|v.v - 1| < {UNIT_NORM_TOLERANCE}).",
    "no_empty_chunks": "No live canonical chunk is empty or whitespace only.",
    "chunk_tokens_within_model_limit": "No live canonical chunk has more tokens than the model reads.",
    "recall_at_10_meets_target": "recall@10 of the new index against exact search reaches the configured target.",
    "codes_have_model_width": "Every int8 code has one byte per dimension and every binary code one bit per dimension.",
    "index_count_matches_live_chunks": "The new index holds exactly one vector per live canonical chunk of its snapshot.",
}
WARNING_CHECKS: dict[str, str] = {
    "dedup_ratio_stable": "The corpus-wide duplicate share moved little since the previous index.",
    "quarantined_or_skipped_share": "Few documents were quarantined or skipped.",
    "language_mix": "One language dominates the corpus (the default model is English-only).",
}


@dataclass(frozen=True)
class WarningThresholds:
    max_dedup_ratio_change: float = 0.2  # absolute change of the duplicate share between two index builds
    max_quarantined_or_skipped_share: float = 0.1
    min_dominant_language_share: float = 0.8


@dataclass(frozen=True)
class GateOutcome:
    """One check's verdict: ``name`` is a key of BLOCKING_GATES or WARNING_CHECKS."""

    name: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking(self) -> bool:
        return self.name in BLOCKING_GATES


class QualityGateError(RuntimeError):
    """A blocking quality gate failed; nothing was published. ``outcomes`` holds every gate evaluated."""

    def __init__(self, outcomes: list[GateOutcome]):
        self.outcomes = outcomes
        failed = [o for o in outcomes if o.blocking and not o.passed]
        super().__init__(
            "index not published, blocking quality gates failed: "
            + "; ".join(f"{o.name}: {o.description}" for o in failed)
        )


def failed_blocking(outcomes: list[GateOutcome]) -> list[GateOutcome]:
    return [o for o in outcomes if o.blocking and not o.passed]


# ----------------------------------------------------------------------------------------- gates

def snapshot_gates(snapshot: Path, *, dimension: int, max_tokens: int) -> list[GateOutcome]:
    """Gates over the build's snapshot (a Parquet file of the live set): dimension, finiteness and unit norm of
    every float32 vector, widths of the int8 and binary codes, no empty chunk, no chunk over ``max_tokens``.

    One scan with an in-memory DuckDB; each failing outcome names how many rows fail and one example chunk id.
    """
    con = duckdb.connect()
    try:
        row = con.execute(
            r"""WITH v AS (
                  SELECT chunk_id, text, token_count, coalesce(len(vector), -1) AS dim,
                         coalesce(list_bool_and(list_transform(vector, lambda x: isfinite(x))), false) AS finite,
                         abs(list_dot_product(vector, vector) - 1) AS norm_error,
                         octet_length(int8) AS int8_bytes, octet_length(ubinary) AS binary_bytes
                  FROM read_parquet(?))
                SELECT count(*),
                       count(*) FILTER (WHERE dim <> ?),
                       count(*) FILTER (WHERE NOT finite),
                       count(*) FILTER (WHERE NOT coalesce(norm_error < ?, false)),
                       max(norm_error) FILTER (WHERE finite),
                       min(chunk_id) FILTER (WHERE dim <> ?),
                       min(chunk_id) FILTER (WHERE NOT finite),
                       min(chunk_id) FILTER (WHERE NOT coalesce(norm_error < ?, false)),
                       count(*) FILTER (WHERE int8_bytes <> ? OR binary_bytes <> ?),
                       min(chunk_id) FILTER (WHERE int8_bytes <> ? OR binary_bytes <> ?),
                       count(*) FILTER (WHERE text IS NULL OR regexp_full_match(text, '[\s\pZ]*')),
                       min(chunk_id) FILTER (WHERE text IS NULL OR regexp_full_match(text, '[\s\pZ]*')),
                       count(*) FILTER (WHERE token_count > ?),
                       max(token_count),
                       min(chunk_id) FILTER (WHERE token_count > ?)
                FROM v""",
            [str(snapshot), dimension, UNIT_NORM_TOLERANCE, dimension, UNIT_NORM_TOLERANCE,
             dimension, dimension // 8, dimension, dimension // 8, max_tokens, max_tokens],
        ).fetchone()
    finally:
        con.close()
    (vectors, wrong_dim, non_finite, not_unit, worst_norm_error, example_dim, example_finite, example_norm,
     wrong_codes, example_codes, empty, example_empty, over, longest, example_over) = row
    base = {"vectors_checked": int(vectors)}

    def example(chunk):
        return f" (e.g. chunk {chunk})" if chunk else ""

    return [
        GateOutcome(
            "vectors_have_model_dimension", wrong_dim == 0,
            f"{wrong_dim} of {vectors} vectors do not have dimension {dimension}{example(example_dim)}",
            {**base, "expected_dimension": dimension, "wrong_dimension": int(wrong_dim)},
        ),
        GateOutcome(
            "vectors_are_finite", non_finite == 0,
            f"{non_finite} of {vectors} vectors hold NaN or infinity{example(example_finite)}",
            {**base, "non_finite": int(non_finite)},
        ),
        GateOutcome(
            "vectors_are_unit_norm", not_unit == 0,
            f"{not_unit} of {vectors} vectors are not unit-norm{example(example_norm)}",
            {**base, "not_unit_norm": int(not_unit), "max_norm_error": float(worst_norm_error or 0.0)},
        ),
        GateOutcome(
            "codes_have_model_width", wrong_codes == 0,
            f"{wrong_codes} of {vectors} codes are not {dimension} int8 bytes and {dimension // 8} binary bytes"
            f"{example(example_codes)}",
            {**base, "wrong_width": int(wrong_codes)},
        ),
        GateOutcome(
            "no_empty_chunks", empty == 0,
            f"{empty} of {vectors} chunks are empty{example(example_empty)}",
            {"chunks_checked": int(vectors), "empty_chunks": int(empty)},
        ),
        GateOutcome(
            "chunk_tokens_within_model_limit", over == 0,
            f"{over} of {vectors} chunks exceed {max_tokens} tokens (longest {longest}){example(example_over)}",
            {"chunks_checked": int(vectors), "token_limit": int(max_tokens), "max_token_count": int(longest or 0),
             "over_limit": int(over)},
        ),
    ]


def index_gates(manifest: dict[str, Any], snapshot_count: int) -> list[GateOutcome]:
    """Gates on a built, not yet published version, read from its manifest (``count``, ``recall_at_k``,
    ``target_recall``), against the row count of the snapshot it was built from."""
    recall = float(manifest["recall_at_k"])
    target = float(manifest["target_recall"])
    count = int(manifest["count"])
    return [
        GateOutcome(
            "recall_at_10_meets_target", recall >= target,
            f"recall@{manifest.get('recall_k', 10)} {recall:.4f} vs target {target:.4f} on "
            f"{manifest.get('tuning_queries', 'vectors')} queries "
            f"({manifest.get('layout')}, nprobe {manifest.get('nprobe')}, rescore x{manifest.get('rescore_multiplier', 1)})",
            {"recall_at_10": recall, "target_recall": target, "nprobe": int(manifest.get("nprobe", 0)),
             "rescore_multiplier": int(manifest.get("rescore_multiplier", 1))},
        ),
        GateOutcome(
            "index_count_matches_live_chunks", count == snapshot_count,
            f"index holds {count} vectors, its snapshot {snapshot_count} live canonical chunks",
            {"index_count": count, "snapshot_chunks": int(snapshot_count)},
        ),
    ]


@dataclass(frozen=True)
class CorpusShares:
    dedup_ratio: float
    documents: int
    quarantined: int
    skipped: int
    languages: dict[str, int]


def corpus_shares(warehouse: WarehouseResource) -> CorpusShares:
    """Corpus-wide duplicate share, quarantined/skipped counts and documents per language."""
    with warehouse.connect(read_only=True) as con:
        live, canonical = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE x.status = 'canonical') FROM chunks k JOIN chunk_dedup x USING (chunk_id)"
        ).fetchone()
        documents = con.execute("SELECT count(*) FROM documents").fetchone()[0]
        quarantined = con.execute("SELECT count(DISTINCT doc_id) FROM quarantine").fetchone()[0]
        skipped = con.execute("SELECT count(*) FROM skipped_files").fetchone()[0]
        languages = dict(
            con.execute("SELECT coalesce(language, 'unknown'), count(*) FROM cleaned_documents GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
        )
    return CorpusShares(
        dedup_ratio=0.0 if not live else 1.0 - canonical / live,
        documents=int(documents), quarantined=int(quarantined), skipped=int(skipped), languages=languages,
    )


def warning_checks(
    shares: CorpusShares, *, previous_dedup_ratio: float | None, thresholds: WarningThresholds = WarningThresholds()
) -> list[GateOutcome]:
    """Non-blocking checks of the corpus; ``previous_dedup_ratio`` is the one recorded with the last index (or None)."""
    change = None if previous_dedup_ratio is None else abs(shares.dedup_ratio - previous_dedup_ratio)
    seen = shares.documents + shares.skipped
    bad_share = (shares.quarantined + shares.skipped) / seen if seen else 0.0
    classified = sum(shares.languages.values())
    dominant, dominant_count = next(iter(shares.languages.items()), ("unknown", 0))
    dominant_share = dominant_count / classified if classified else 1.0
    return [
        GateOutcome(
            "dedup_ratio_stable", change is None or change <= thresholds.max_dedup_ratio_change,
            f"duplicate share {shares.dedup_ratio:.3f}"
            + ("" if previous_dedup_ratio is None else f", was {previous_dedup_ratio:.3f} at the previous index"),
            {"dedup_ratio": round(shares.dedup_ratio, 4),
             "previous_dedup_ratio": float(previous_dedup_ratio) if previous_dedup_ratio is not None else -1.0,
             "max_change": thresholds.max_dedup_ratio_change},
        ),
        GateOutcome(
            "quarantined_or_skipped_share", bad_share <= thresholds.max_quarantined_or_skipped_share,
            f"{shares.quarantined} quarantined and {shares.skipped} skipped of {seen} files ({bad_share:.1%})",
            {"quarantined": shares.quarantined, "skipped": shares.skipped, "share": round(bad_share, 4),
             "max_share": thresholds.max_quarantined_or_skipped_share},
        ),
        GateOutcome(
            "language_mix", dominant_share >= thresholds.min_dominant_language_share,
            f"{dominant_share:.1%} of {classified} documents are '{dominant}'",
            {"dominant_language": dominant, "dominant_share": round(dominant_share, 4),
             "languages": dg.MetadataValue.json(shares.languages),
             "min_dominant_share": thresholds.min_dominant_language_share},
        ),
    ]


# ---------------------------------------------------------------------------------------- dagster


def quality_check_specs() -> list[dg.AssetCheckSpec]:
    """Check specs of ``faiss_index``: the blocking gates and the warnings."""
    return [dg.AssetCheckSpec(name, asset=ASSET, description=text, blocking=True) for name, text in BLOCKING_GATES.items()] + [
        dg.AssetCheckSpec(name, asset=ASSET, description=text) for name, text in WARNING_CHECKS.items()
    ]


def to_check_result(outcome: GateOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=ASSET,
        check_name=outcome.name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.ERROR if outcome.blocking else dg.AssetCheckSeverity.WARN,
        description=outcome.description,
        metadata=outcome.metadata,
    )


def previous_dedup_ratio(instance: dg.DagsterInstance) -> float | None:
    """The corpus duplicate share recorded with the last faiss_index materialization, if any."""
    event = instance.get_latest_materialization_event(dg.AssetKey(ASSET))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("dedup_ratio")
    return float(value.value) if value is not None else None


def outcomes_table(outcomes: list[GateOutcome]) -> str:
    """Markdown table of check verdicts for the materialization summary."""
    lines = ["| check | kind | verdict | detail |", "|---|---|---|---|"]
    for o in outcomes:
        verdict = "pass" if o.passed else ("FAIL" if o.blocking else "warn")
        lines.append(f"| {o.name} | {'blocking' if o.blocking else 'warning'} | {verdict} | {o.description.replace('|', '/')} |")
    return "\n".join(lines)
