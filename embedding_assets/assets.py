"""The seven software-defined assets, in data-flow order.

Assets are thin: they read their settings, call the stage function (``embedding_assets.stages``),
and report what a person wants to see in the UI. Data lives in the warehouse and the index store,
never in Dagster's pickling IO manager, so nothing big travels between steps.
"""


import dataclasses
from collections.abc import Iterator

import dagster as dg

from embedding_assets.cluster.executor import GPU_QUEUE, QUEUE_TAG
from pydantic import Field

from embedding_assets.checks import (
    GateOutcome,
    QualityGateError,
    corpus_shares,
    failed_blocking,
    index_gates,
    outcomes_table,
    previous_dedup_ratio,
    quality_check_specs,
    snapshot_gates,
    to_check_result,
    warning_checks,
)
from embedding_assets.core.chunking import ChunkingSettings, max_chunk_tokens
from embedding_assets.core.index_version import CHUNK_SCHEMA
from embedding_assets.core.source_fingerprint import source_fingerprint
from embedding_assets.core.sources import SourceMissing, source_dir
from embedding_assets.core.dedup import MinHashSettings
from embedding_assets.partitions import sources_partitions
from embedding_assets.progress import for_context
from embedding_assets.settings import Settings, load_settings
from embedding_assets.stages.chunks import chunk_source
from embedding_assets.stages.cleaned_documents import clean_source
from embedding_assets.stages.deduped_chunks import dedup_source
from embedding_assets.stages.embeddings import embed_source
from embedding_assets.stages.faiss_index import IndexSettings, build_and_publish
from embedding_assets.stages.quantized_embeddings import quantize_source
from embedding_assets.stages.raw_documents import ingest_source
from embedding_assets.stages.signals import ASSET_TABLES, corpus_totals, partition_signals
from resources import (
    DocumentSourcesResource,
    EmbeddingCacheResource,
    EmbeddingModelResource,
    IndexStoreResource,
    WarehouseResource,
)

GROUP = "embedding_pipeline"
OWNERS = ["team:search-platform"]
WAREHOUSE_TAGS = {"layer": "warehouse"}
# Steps that write the warehouse queue on one pool (set a limit for it in dagster.yaml, see README);
# the warehouse's file lock keeps them correct even without a limit.
WAREHOUSE_POOL = "embedding_warehouse"
# A new index version follows every ingest that changed the live set, without a person stepping in: the
# automation sensor (``index_freshness``, running wherever the Dagster daemon runs) requests faiss_index once
# any quantized_embeddings partition updated, but never while an ingest is still in progress or another
# build of the index is running. A source that was never materialized does not hold the index back.
INDEX_FRESHNESS = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("rebuild after an ingest changed the live set")


class RawDocumentsConfig(dg.Config):
    allow_empty: bool = Field(
        default=False,
        description="Allow an empty or missing source folder to delete every stored document of the source.",
    )


def _unset_means(field: str, what: str) -> str:
    """A config field's description: unset (the default) takes the EMBEDDING_* setting, read when the run starts."""
    info = Settings.model_fields[field]
    default = (info.json_schema_extra or {}).get("doc_default", info.default)
    return f"{what} Unset: {Settings.env_name(field)} (default {default})."


class ChunkingConfig(dg.Config):
    chunk_tokens: int | None = Field(default=None, description=_unset_means("chunk_tokens", "Max tokens per chunk."))
    overlap_tokens: int | None = Field(default=None, description=_unset_means("chunk_overlap", "Tokens repeated after a cut inside a paragraph."))
    min_chunk_tokens: int | None = Field(default=None, description=_unset_means("min_chunk_tokens", "Smallest chunk a cut may leave (a document's last chunk excepted)."))
    contextual: bool | None = Field(default=None, description=_unset_means("contextual_chunks", "The model reads the document title and heading path before each chunk's text."))

    def to_settings(self, s: Settings) -> ChunkingSettings:
        return ChunkingSettings(
            _given(self.chunk_tokens, s.chunk_tokens), _given(self.overlap_tokens, s.chunk_overlap),
            _given(self.min_chunk_tokens, s.min_chunk_tokens), _given(self.contextual, s.contextual_chunks),
        )


class DedupConfig(dg.Config):
    threshold: float | None = Field(default=None, description=_unset_means("dedup_threshold", "MinHash Jaccard threshold."))
    num_perm: int | None = Field(default=None, description=_unset_means("dedup_num_perm", "MinHash permutations."))
    shingle_words: int | None = Field(default=None, description=_unset_means("dedup_shingle_words", "Words per shingle."))

    def to_settings(self, s: Settings) -> MinHashSettings:
        return MinHashSettings(
            num_perm=_given(self.num_perm, s.dedup_num_perm), shingle_words=_given(self.shingle_words, s.dedup_shingle_words),
            threshold=_given(self.threshold, s.dedup_threshold),
        )


class IndexConfig(dg.Config):
    layout: str | None = Field(
        default=None,
        description=_unset_means(
            "index_layout",
            "binary: Hamming IVF over sign bits in memory, candidates rescored with int8 codes read from disk "
            "(32x smaller in memory than float32); int8: IVF over int8 codes (4x smaller).",
        ),
    )
    target_recall: float | None = Field(default=None, description=_unset_means("target_recall", "recall@10 against exact float32 search that nprobe (and the rescore multiplier) are tuned to."))
    recall_queries: int | None = Field(default=None, description=_unset_means("recall_queries", "Sampled queries for recall."))
    min_nlist: int | None = Field(default=None, description=_unset_means("min_nlist", "Below this many lists, build a flat index."))
    lexical: bool | None = Field(default=None, description=_unset_means("lexical_index", "Publish a BM25 index inside each version (lexical and hybrid search)."))

    def to_settings(self, s: Settings | None = None) -> IndexSettings:
        s = s or load_settings()
        return IndexSettings(
            layout=_given(self.layout, s.index_layout), target_recall=_given(self.target_recall, s.target_recall),
            recall_queries=_given(self.recall_queries, s.recall_queries), min_nlist=_given(self.min_nlist, s.min_nlist),
            lexical=_given(self.lexical, s.lexical_index),
        )


def _given(value, setting):
    return setting if value is None else value


def _partition_signals(warehouse: WarehouseResource, asset: str, source: str) -> tuple[dg.DataVersion, dict]:
    """The data version of one source's rows (unchanged rows: unchanged version, so a no-op run leaves
    downstream assets synced) and the column schema of the asset's table, as the database has it."""
    digest, columns = partition_signals(warehouse, asset, source)  # one read-only unit of work
    version = dg.DataVersion(digest)
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns])
    return version, {"dagster/column_schema": schema, "dagster/table_name": f"warehouse.{ASSET_TABLES[asset]}"}


@dg.asset(
    partitions_def=sources_partitions,
    group_name=GROUP,
    kinds={"duckdb"},
    owners=OWNERS,
    tags=WAREHOUSE_TAGS,
    pool=WAREHOUSE_POOL,
    description="Files of one source: relative path, bytes, content sha256, size, mtime. Unsupported or refused files are recorded with a reason.",
)
def raw_documents(
    context: dg.AssetExecutionContext,
    config: RawDocumentsConfig,
    sources: DocumentSourcesResource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    source = context.partition_key
    folder = source_dir(sources.root_path, source)  # refuses a partition key that is no folder name
    # Taken before the scan: a file saved during the run makes the sensor's next fingerprint differ, so it runs again.
    fingerprint = source_fingerprint(folder) if folder.is_dir() else None
    try:
        r = ingest_source(
            warehouse, sources.root_path, source,
            max_file_bytes=sources.max_file_bytes, allow_empty=config.allow_empty, progress=for_context(context),
        )
    except SourceMissing as exc:
        # A partition without a folder (deleted, moved, or added by mistake in the UI): nothing was written.
        raise dg.Failure(
            description=f"{exc}. Nothing was written. If the partition was added by mistake or the source is gone for "
            f"good, launch the remove_source job for partition {source!r} (or `embedding-pipeline remove-source {source}`).",
            allow_retries=False,
        ) from None
    version, table = _partition_signals(warehouse, "raw_documents", context.partition_key)
    return dg.MaterializeResult(
        data_version=version,
        metadata={
            **table,
            "dagster/row_count": r.live_documents,
            "added": r.added, "updated": r.updated, "unchanged": r.unchanged, "deleted": r.deleted,
            "source_fingerprint": fingerprint or "missing",
            "renamed": r.renamed, "skipped": len(r.skipped), "bytes_read": r.bytes_read, "seconds": round(r.seconds, 3),
            "skipped_files": dg.MetadataValue.md(_table(["file", "reason"], [(s.relative_path, s.reason) for s in r.skipped])),
        }
    )


@dg.asset(
    partitions_def=sources_partitions,
    deps=[raw_documents],
    group_name=GROUP,
    kinds={"duckdb"},
    owners=OWNERS,
    tags=WAREHOUSE_TAGS,
    pool=WAREHOUSE_POOL,
    description="Text and heading structure extracted with a real HTML parser, Markdown/RST markup removed, Unicode normalized, language detected. Documents without text are quarantined with the reason.",
)
def cleaned_documents(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    r = clean_source(warehouse, context.partition_key, progress=for_context(context))
    version, table = _partition_signals(warehouse, "cleaned_documents", context.partition_key)
    return dg.MaterializeResult(
        data_version=version,
        metadata={
            **table,
            "dagster/row_count": r.live_documents,
            "cleaned": r.cleaned, "unchanged": r.unchanged, "quarantined": len(r.quarantined),
            "warnings": r.warnings, "characters": r.characters, "seconds": round(r.seconds, 3),
            "languages": dg.MetadataValue.json(r.languages),
            "quarantine": dg.MetadataValue.md(_table(["file", "reason"], r.quarantined)),
        }
    )


@dg.asset(
    partitions_def=sources_partitions,
    deps=[cleaned_documents],
    group_name=GROUP,
    kinds={"duckdb"},
    owners=OWNERS,
    tags=WAREHOUSE_TAGS,
    pool=WAREHOUSE_POOL,
    description="Structure-aware chunks measured in the model's own tokens, never over its limit, with stable content-derived chunk ids and character offsets.",
)
def chunks(
    context: dg.AssetExecutionContext, config: ChunkingConfig, warehouse: WarehouseResource, model: EmbeddingModelResource
) -> dg.MaterializeResult:
    tokenizer = model.tokenizer()
    max_tokens = max_chunk_tokens(tokenizer, model.effective_max_seq_length())
    r = chunk_source(
        warehouse, context.partition_key,
        tokenizer=tokenizer, tokenizer_fingerprint=model.tokenizer_fingerprint(), max_tokens=max_tokens,
        settings=config.to_settings(load_settings()),
        progress=for_context(context),
    )
    version, table = _partition_signals(warehouse, "chunks", context.partition_key)
    return dg.MaterializeResult(
        data_version=version,
        metadata={
            **table,
            "dagster/row_count": r.live_chunks,
            "documents_chunked": r.documents_chunked, "documents_unchanged": r.documents_unchanged,
            "documents_quarantined": r.quarantined,
            "chunks_added": r.chunks_added, "chunks_removed": r.chunks_removed, "chunks_unchanged": r.chunks_unchanged,
            "tokens_chunked": r.tokens, "max_token_count": r.max_token_count, "token_limit": max_tokens,
            "seconds": round(r.seconds, 3),
        }
    )


@dg.asset(
    partitions_def=sources_partitions,
    deps=[chunks],
    group_name=GROUP,
    kinds={"duckdb"},
    owners=OWNERS,
    tags=WAREHOUSE_TAGS,
    pool=WAREHOUSE_POOL,
    description="Exact (normalized-text hash) and near (MinHash LSH) duplicates removed across all sources; each dropped chunk records which chunk it duplicates.",
)
def deduped_chunks(context: dg.AssetExecutionContext, config: DedupConfig, warehouse: WarehouseResource) -> dg.MaterializeResult:
    r = dedup_source(warehouse, context.partition_key, settings=config.to_settings(load_settings()), progress=for_context(context))
    version, table = _partition_signals(warehouse, "deduped_chunks", context.partition_key)
    return dg.MaterializeResult(
        data_version=version,
        metadata={
            **table,
            "dagster/row_count": r.live_canonical,
            "live_chunks": r.live_chunks, "decided": r.decided, "canonical": r.canonical,
            "exact_duplicates": r.exact_duplicates, "near_duplicates": r.near_duplicates,
            "redecided": r.redecided, "decisions_removed": r.decisions_removed,
            "dedup_ratio": round(r.dedup_ratio, 4), "seconds": round(r.seconds, 3),
        }
    )


@dg.asset(
    partitions_def=sources_partitions,
    deps=[deduped_chunks],
    group_name=GROUP,
    kinds={"duckdb", "pytorch"},
    owners=OWNERS,
    tags=WAREHOUSE_TAGS,
    pool=WAREHOUSE_POOL,
    op_tags={QUEUE_TAG: GPU_QUEUE},  # the Celery executor sends this step to GPU workers (ignored in-process)
    description="float32 L2-normalized vectors of the canonical chunks; only cache misses reach the model, which is loaded only when needed.",
)
def embeddings(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    model: EmbeddingModelResource,
    cache: EmbeddingCacheResource,
) -> dg.MaterializeResult:
    r = embed_source(warehouse, context.partition_key, model=model, cache=cache, progress=for_context(context))
    version, table = _partition_signals(warehouse, "embeddings", context.partition_key)
    looked_up = r.pending
    hits = sum(r.cache_hits.values())
    # Rates only when there was something to rate: a run that looked nothing up or embedded nothing
    # reports no hit rate and no throughput (a 1.0 or a 0 would be plotted as if it were measured).
    rates: dict[str, float] = {}
    if looked_up:
        rates["cache_hit_rate"] = round(hits / looked_up, 4)
    if r.embedded_by_model:
        rates["chunks_per_second"] = round(r.chunks_per_second, 2)
        rates["padding_waste"] = round(r.padding_waste, 4)
    return dg.MaterializeResult(
        data_version=version,
        metadata={
            **table,
            "dagster/row_count": r.live_vectors,
            "model_fingerprint": r.model_fingerprint, "dimension": r.dimension,
            "chunks_looked_up": looked_up,
            "embedded_by_model": r.embedded_by_model, "tokens_embedded": r.tokens_embedded,
            "cache_hits_lru": r.cache_hits.get("lru", 0), "cache_hits_redis": r.cache_hits.get("redis", 0),
            "cache_hits_disk": r.cache_hits.get("disk", 0),
            **rates,
            "redis_status": r.redis_status, "vectors_removed": r.removed,
            **r.trust_metadata(),
            "seconds": round(r.seconds, 3),
            "summary": dg.MetadataValue.md(_table(["metric", "value"], [
                ("live vectors", r.live_vectors), ("looked up in the cache", looked_up),
                ("embedded by the model", r.embedded_by_model),
                ("tokens embedded", r.tokens_embedded), ("cache hits (lru / redis / disk)",
                 " / ".join(str(r.cache_hits.get(t, 0)) for t in ("lru", "redis", "disk"))),
                ("cache hit rate", f"{hits / looked_up:.1%}" if looked_up else "n/a (nothing looked up)"),
                ("vectors removed", r.removed),
                ("chunks per second", rates.get("chunks_per_second", "n/a (nothing embedded)")),
                ("seconds", round(r.seconds, 3)),
            ])),
        }
    )


@dg.asset(
    partitions_def=sources_partitions,
    deps=[embeddings],
    group_name=GROUP,
    kinds={"duckdb"},
    owners=OWNERS,
    tags=WAREHOUSE_TAGS,
    pool=WAREHOUSE_POOL,
    description="int8 codes (calibration ranges computed once per model from a corpus sample and reused) and packed binary codes.",
)
def quantized_embeddings(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, model: EmbeddingModelResource
) -> dg.MaterializeResult:
    r = quantize_source(warehouse, context.partition_key, model_fingerprint=model.model_fingerprint(), progress=for_context(context))
    version, table = _partition_signals(warehouse, "quantized_embeddings", context.partition_key)
    return dg.MaterializeResult(
        data_version=version,
        metadata={
            **table,
            "dagster/row_count": r.live_codes,
            "quantized": r.quantized, "removed": r.removed,
            "calibration_sample_size": r.calibration_sample_size, "calibrated_now": r.calibrated_now,
            **{f"bytes_per_vector_{k}": v for k, v in r.bytes_per_vector.items()},
            "seconds": round(r.seconds, 3),
        }
    )


@dg.asset(
    deps=[quantized_embeddings],
    group_name=GROUP,
    kinds={"faiss"},
    owners=OWNERS,
    tags={"layer": "index"},
    check_specs=quality_check_specs(),
    automation_condition=INDEX_FRESHNESS,
    description=(
        "A self-contained index version built from the quantized codes of one snapshot of the live set: the FAISS "
        "index (binary or int8 layout), the id -> chunk map and the manifest, published atomically. nprobe (and the "
        "rescore multiplier) are tuned to the recall target against exact float32 search. Blocking quality gates "
        "(asset checks) run before publishing: when one fails the run fails and the previous version stays current."
    ),
)
def faiss_index(
    context: dg.AssetExecutionContext,
    config: IndexConfig,
    warehouse: WarehouseResource,
    index_store: IndexStoreResource,
    model: EmbeddingModelResource,
) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
    settings = config.to_settings()
    fingerprint, dimension = model.model_fingerprint(), model.dimension()
    max_tokens = max_chunk_tokens(model.tokenizer(), model.effective_max_seq_length())
    gates: list[GateOutcome] = []

    def gate_snapshot(snapshot, count):
        gates.extend(snapshot_gates(snapshot, dimension=dimension, max_tokens=max_tokens))
        if failed_blocking(gates):
            raise QualityGateError(gates)

    def gate_index(manifest, snapshot_count):
        gates.extend(index_gates(manifest, snapshot_count))
        manifest["gates"] = [dataclasses.asdict(g) for g in gates]
        if failed_blocking(gates):
            raise QualityGateError(gates)

    shares = corpus_shares(warehouse)
    warnings = warning_checks(shares, previous_dedup_ratio=previous_dedup_ratio(context.instance))
    try:
        r, published = build_and_publish(
            warehouse, index_store, model_fingerprint=fingerprint, dimension=dimension, settings=settings,
            gate_snapshot=gate_snapshot, gate_index=gate_index, progress=for_context(context),
            query_encoder=lambda texts: model.encode(texts)[0],
        )
    except QualityGateError as exc:
        yield from (to_check_result(o) for o in exc.outcomes + warnings)
        raise
    if r.mode == "unchanged":  # not published again: the kept version's gates stand
        gates = [GateOutcome(**g) for g in published.manifest.get("gates", [])]
    outcomes = gates + warnings
    totals = corpus_totals(warehouse, published.path)
    summary = {
        "vectors": r.count, "build mode": r.mode, "layout": r.layout, "nlist": r.nlist, "nprobe": r.nprobe,
        "rescore multiplier": r.rescore_multiplier, "recall@10": f"{r.recall_at_k:.4f} (target {settings.target_recall})",
        "index bytes": r.index_bytes, "version bytes": r.version_bytes, "chunks waiting for codes": r.pending,
        "duplicate share": f"{shares.dedup_ratio:.3f}", "seconds": round(r.seconds, 3),
    }
    yield dg.MaterializeResult(
        check_results=[to_check_result(o) for o in outcomes],
        # The published version is the index's data: an unchanged build keeps it, so nothing looks stale.
        data_version=dg.DataVersion(r.version),
        metadata={
            "dagster/column_schema": _CHUNK_MAP_SCHEMA,
            # Corpus-wide totals (a partitioned asset's row count is its latest partition only).
            "corpus_documents": sum(t.documents for t in totals.values()),
            "corpus_chunks": sum(t.chunks for t in totals.values()),
            "corpus_canonical_chunks": sum(t.canonical_chunks for t in totals.values()),
            "corpus_vectors": sum(t.vectors for t in totals.values()),
            "corpus_sources": len(totals),
            "corpus_by_source": dg.MetadataValue.table(
                records=[dg.TableRecord({"source": name, **dataclasses.asdict(t)}) for name, t in totals.items()],
                schema=_TOTALS_SCHEMA,
            ),
            "summary": dg.MetadataValue.md(_table(["metric", "value"], summary.items()) + "\n\n" + outcomes_table(outcomes)),
            "bytes_per_vector": round(r.index_bytes / r.count, 2) if r.count else 0.0,
            "dedup_ratio": round(shares.dedup_ratio, 4), "documents": shares.documents,
            "quarantined": shares.quarantined, "skipped": shares.skipped,
            "dagster/row_count": r.count, "pending_chunks": r.pending,
            "build_mode": r.mode, "retrain_reason": r.retrain_reason, "vectors_added": r.added, "vectors_removed": r.removed,
            "version": r.version, "path": str(published.path), "layout": r.layout,
            "nlist": r.nlist, "nprobe": r.nprobe, "rescore_multiplier": r.rescore_multiplier,
            "recall_at_10": round(r.recall_at_k, 4),
            "training_points": r.training_points, "index_bytes": r.index_bytes, "version_bytes": r.version_bytes,
            "dimension": r.dimension, "seconds": round(r.seconds, 3),
        }
    )


_TOTALS_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("source", "string", description="source folder (partition)"),
    dg.TableColumn("documents", "int", description="live documents in the warehouse"),
    dg.TableColumn("chunks", "int", description="live chunks, duplicates included"),
    dg.TableColumn("canonical_chunks", "int", description="chunks left after dedup"),
    dg.TableColumn("vectors", "int", description="vectors of the source in the published index"),
])


def _arrow_schema_to_table_schema(schema) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


_CHUNK_MAP_SCHEMA = _arrow_schema_to_table_schema(CHUNK_SCHEMA)


def _table(header: list[str], rows) -> str:
    rows = list(rows)
    if not rows:
        return "_none_"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows[:200]]
    if len(rows) > 200:
        lines.append(f"| … {len(rows) - 200} more | |")
    return "\n".join(lines)


PIPELINE_ASSETS = [raw_documents, cleaned_documents, chunks, deduped_chunks, embeddings, quantized_embeddings, faiss_index]
