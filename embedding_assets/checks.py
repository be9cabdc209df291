"""Quality gates of the index: the asset checks of ``faiss_index``.

Publishing happens inside the ``faiss_index`` asset, so a separate check step would run after a bad
index was already current. The gates therefore run inside the asset, in two places:

- before the build, over the warehouse (:func:`vector_gates`, :func:`chunk_gates`): vectors have the
  model's dimension, are finite and unit-norm; no empty chunk; no chunk over the model's token limit;
- after the build and before the atomic publish (:func:`index_gates`, run by :class:`GatedIndexStore`,
  which wraps the index store the stage publishes through): recall@10 of the new index against exact
  search reaches the target, and the index holds exactly one vector per live canonical chunk.

A failed blocking gate is reported as a failed, blocking ``AssetCheckResult`` and the step fails before
``publish``; the previous version stays current. Warnings (:func:`warning_checks`: dedup ratio jump,
share of quarantined/skipped documents, language mix) never stop anything; they are WARN results.

The gate functions take plain values and the warehouse; only the last section touches Dagster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from embedding_assets.stages.faiss_index import CorpusChanged, live_snapshot
from resources.index_store import IndexStoreResource, PublishedIndex
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
    "index_count_matches_live_chunks": "The new index holds exactly one vector per live canonical chunk.",
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

_LIVE_CANONICAL = "FROM chunks k JOIN chunk_dedup x USING (chunk_id) WHERE x.status = 'canonical'"


def vector_gates(warehouse: WarehouseResource, *, model_fingerprint: str, dimension: int) -> list[GateOutcome]:
    """Dimension, finiteness and unit norm of every live canonical vector of the model, in one DuckDB scan.

    Returns three outcomes; each failing one names how many vectors fail and one example chunk id.
    """
    (vectors, wrong_dim, non_finite, not_unit, worst_norm_error, example_dim, example_finite, example_norm) = warehouse.query_rows(
        f"""WITH v AS (
              SELECT e.chunk_id, coalesce(len(e.vector), -1) AS dim,
                     coalesce(list_bool_and(list_transform(e.vector, lambda x: isfinite(x))), false) AS finite,
                     abs(list_dot_product(e.vector, e.vector) - 1) AS norm_error
              FROM embeddings e JOIN chunk_dedup x USING (chunk_id) JOIN chunks k USING (chunk_id)
              WHERE x.status = 'canonical' AND e.model_fingerprint = ?)
            SELECT count(*),
                   count(*) FILTER (WHERE dim <> ?),
                   count(*) FILTER (WHERE NOT finite),
                   count(*) FILTER (WHERE NOT coalesce(norm_error < ?, false)),
                   max(norm_error) FILTER (WHERE finite),
                   min(chunk_id) FILTER (WHERE dim <> ?),
                   min(chunk_id) FILTER (WHERE NOT finite),
                   min(chunk_id) FILTER (WHERE NOT coalesce(norm_error < ?, false))
            FROM v""",
        [model_fingerprint, dimension, UNIT_NORM_TOLERANCE, dimension, UNIT_NORM_TOLERANCE],
    )[0]
    base = {"vectors_checked": int(vectors)}
    return [
        GateOutcome(
            "vectors_have_model_dimension", wrong_dim == 0,
            f"{wrong_dim} of {vectors} vectors do not have dimension {dimension}"
            + (f" (e.g. chunk {example_dim})" if example_dim else ""),
            {**base, "expected_dimension": dimension, "wrong_dimension": int(wrong_dim)},
        ),
        GateOutcome(
            "vectors_are_finite", non_finite == 0,
            f"{non_finite} of {vectors} vectors hold NaN or infinity" + (f" (e.g. chunk {example_finite})" if example_finite else ""),
            {**base, "non_finite": int(non_finite)},
        ),
        GateOutcome(
            "vectors_are_unit_norm", not_unit == 0,
            f"{not_unit} of {vectors} vectors are not unit-norm" + (f" (e.g. chunk {example_norm})" if example_norm else ""),
            {**base, "not_unit_norm": int(not_unit), "max_norm_error": float(worst_norm_error or 0.0)},
        ),
    ]


def chunk_gates(warehouse: WarehouseResource, *, max_tokens: int) -> list[GateOutcome]:
    """No empty chunk and no chunk over ``max_tokens`` among the live canonical chunks."""
    chunks, empty, over, longest, example_empty, example_over = warehouse.query_rows(
        rf"""SELECT count(*),
                   count(*) FILTER (WHERE k.text IS NULL OR regexp_full_match(k.text, '[\s\pZ]*')),
                   count(*) FILTER (WHERE k.token_count > ?),
                   max(k.token_count),
                   min(k.chunk_id) FILTER (WHERE k.text IS NULL OR regexp_full_match(k.text, '[\s\pZ]*')),
                   min(k.chunk_id) FILTER (WHERE k.token_count > ?)
            {_LIVE_CANONICAL}""",
        [max_tokens, max_tokens],
    )[0]
    return [
        GateOutcome(
            "no_empty_chunks", empty == 0,
            f"{empty} of {chunks} chunks are empty" + (f" (e.g. chunk {example_empty})" if example_empty else ""),
            {"chunks_checked": int(chunks), "empty_chunks": int(empty)},
        ),
        GateOutcome(
            "chunk_tokens_within_model_limit", over == 0,
            f"{over} of {chunks} chunks exceed {max_tokens} tokens (longest {longest})"
            + (f" (e.g. chunk {example_over})" if example_over else ""),
            {"chunks_checked": int(chunks), "token_limit": int(max_tokens), "max_token_count": int(longest or 0),
             "over_limit": int(over)},
        ),
    ]


def index_gates(warehouse: WarehouseResource, manifest: dict[str, Any]) -> list[GateOutcome]:
    """Gates on a built, not yet published index, read from its manifest (``count``, ``recall_at_k``, ``target_recall``)."""
    recall = float(manifest["recall_at_k"])
    target = float(manifest["target_recall"])
    count = int(manifest["count"])
    live = int(warehouse.query_rows(f"SELECT count(*) {_LIVE_CANONICAL}")[0][0])
    return [
        GateOutcome(
            "recall_at_10_meets_target", recall >= target,
            f"recall@{manifest.get('recall_k', 10)} {recall:.4f} vs target {target:.4f} (nprobe {manifest.get('nprobe')})",
            {"recall_at_10": recall, "target_recall": target, "nprobe": int(manifest.get("nprobe", 0))},
        ),
        GateOutcome(
            "index_count_matches_live_chunks", count == live,
            f"index holds {count} vectors, warehouse has {live} live canonical chunks",
            {"index_count": count, "live_canonical_chunks": live},
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


class GatedIndexStore:
    """The index store as the faiss_index stage sees it, with :func:`index_gates` run right before publish.

    ``build_and_publish`` writes the new version into ``new_version()`` and then calls ``publish``;
    when a blocking gate fails here, :class:`QualityGateError` propagates out of the ``new_version``
    block, which deletes the scratch folder, and ``CURRENT`` keeps naming the previous version.
    """

    def __init__(self, store: IndexStoreResource, warehouse: WarehouseResource):
        self._store = store
        self._warehouse = warehouse
        self.outcomes: list[GateOutcome] = []

    def current(self) -> PublishedIndex | None:
        return self._store.current()

    def new_version(self):
        return self._store.new_version()

    def publish(self, scratch: Path, manifest: dict[str, Any]) -> PublishedIndex:
        # A run that wrote after the build's last look would fail the count gate for no fault of the
        # index: that is a changed corpus (build again), not a bad index.
        expected = manifest.get("live_snapshot")
        if expected is not None and asdict(live_snapshot(self._warehouse, manifest["model_fingerprint"])) != expected:
            raise CorpusChanged("another run changed the live chunks while the index was being built")
        self.outcomes = index_gates(self._warehouse, manifest)
        if failed_blocking(self.outcomes):
            raise QualityGateError(self.outcomes)
        return self._store.publish(scratch, manifest)


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
