"""Run the jobs in-process against a Dagster instance and collect their reports.

Used by the CLI and the tests: runs are recorded in the instance like any other run, so they show
in the UI's run history when the instance is the UI's (``DAGSTER_HOME``).
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from embedding_assets.inflight import covers, ingests_in_flight, release_dead_runs, run_tags
from embedding_assets.partitions import SOURCES_PARTITIONS_NAME

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


class RunFailed(RuntimeError):
    """A job failed; ``cause`` is the user-code exception when there was one."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


def ensure_partitions(instance: dg.DagsterInstance, names: list[str]) -> None:
    new = [n for n in names if not instance.has_dynamic_partition(SOURCES_PARTITIONS_NAME, n)]
    if new:
        try:
            instance.add_dynamic_partitions(SOURCES_PARTITIONS_NAME, new)
        except Exception:  # another process added them between the check and the insert (unique key)
            if not all(instance.has_dynamic_partition(SOURCES_PARTITIONS_NAME, n) for n in new):
                raise


def materialize_source(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    source: str,
    *,
    allow_empty: bool = False,
    quiet: bool = True,
    op_config: dict[str, dict] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run stages 1-6 for one source; returns {asset: metadata}. Raises RunFailed.

    ``op_config`` sets asset config by asset name, e.g. ``{"chunks": {"chunk_tokens": 120}}``.
    """
    ensure_partitions(instance, [source])
    run_config: dict[str, Any] = dict(QUIET) if quiet else {}
    ops = {name: {"config": config} for name, config in (op_config or {}).items()}
    if allow_empty:
        ops.setdefault("raw_documents", {"config": {}})["config"]["allow_empty"] = True
    if ops:
        run_config["ops"] = ops
    return _execute(defs.resolve_job_def("ingest_source"), instance, run_config, partition_key=source)


def materialize_index(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *,
    quiet: bool = True,
    index_config: dict | None = None,
    skip_if_current: bool = False,
) -> dict[str, Any]:
    """Build and publish the index; returns the faiss_index metadata. Raises RunFailed.

    With ``skip_if_current``, no run is launched when the published index already holds exactly the
    live vectors with the same model and settings; the published manifest is returned instead.
    """
    try:
        waiting_for = _sources_still_running(defs, instance)
    except Exception as exc:  # noqa: BLE001 - same contract as a failed run: RunFailed with the cause
        raise RunFailed(f"{type(exc).__name__}: {exc}", exc) from exc
    if waiting_for:
        # Another run is still embedding these sources; it builds the index when it is done, and an
        # index built now would miss its vectors (the build refuses that).
        return {
            "build_mode": "deferred", "run_skipped": True,
            "reason": f"runs still in progress for {', '.join(waiting_for)}; the last of them builds the index",
        }
    if skip_if_current:
        try:
            published = _current_index_if_unchanged(defs, index_config or {})
        except Exception as exc:  # noqa: BLE001
            raise RunFailed(f"{type(exc).__name__}: {exc}", exc) from exc
        if published is not None:
            m = published.manifest
            return {
                "build_mode": "unchanged", "run_skipped": True, "version": published.version,
                "row_count": m["count"], "factory": m["factory"], "nlist": m["nlist"], "nprobe": m["nprobe"],
                "recall_at_10": m["recall_at_k"], "vectors_added": 0, "vectors_removed": 0, "seconds": 0.0,
            }
    run_config: dict[str, Any] = dict(QUIET) if quiet else {}
    if index_config:
        run_config["ops"] = {"faiss_index": {"config": index_config}}
    return _execute(defs.resolve_job_def("build_index"), instance, run_config)["faiss_index"]


def _execute(job, instance, run_config, partition_key: str | None = None) -> dict[str, dict[str, Any]]:
    release_dead_runs(instance)
    tags = run_tags()
    try:
        result = job.execute_in_process(instance=instance, run_config=run_config, partition_key=partition_key, tags=tags)
    except Exception as exc:  # noqa: BLE001 - execute_in_process re-raises the user code's own exception
        cause = getattr(exc, "user_exception", None) or exc
        where = f" (source {partition_key})" if partition_key else ""
        raise RunFailed(f"{type(cause).__name__}{where}: {cause}", cause) from exc
    return materializations(result)


def materializations(result) -> dict[str, dict[str, Any]]:
    """{asset key: metadata values} of a run's materializations; dagster/row_count becomes row_count."""
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out[mat.asset_key.to_user_string()] = {
            key.removeprefix("dagster/"): value.value for key, value in mat.metadata.items()
        }
    return out


def source_summary(assets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run report users know, from one source's materializations: documents and chunks
    added/updated/unchanged/deleted, chunks embedded by the model, cache hits per tier, seconds per stage."""
    raw = assets.get("raw_documents", {})
    chunks = assets.get("chunks", {})
    emb = assets.get("embeddings", {})
    return {
        "documents": {k: raw.get(k, 0) for k in ("added", "updated", "unchanged", "deleted", "renamed", "skipped")},
        "chunks": {
            "added": chunks.get("chunks_added", 0),
            "removed": chunks.get("chunks_removed", 0),
            "unchanged": chunks.get("chunks_unchanged", 0),
        },
        "quarantined": assets.get("cleaned_documents", {}).get("quarantined", 0),
        "embedded_by_model": emb.get("embedded_by_model", 0),
        "cache_hits": {tier: emb.get(f"cache_hits_{tier}", 0) for tier in ("lru", "redis", "disk")},
        "redis_status": emb.get("redis_status"),
        "seconds": {asset: meta.get("seconds") for asset, meta in assets.items()},
    }


def _current_index_if_unchanged(defs: dg.Definitions, index_config: dict):
    from embedding_assets.assets import IndexConfig
    from embedding_assets.stages.faiss_index import current_if_unchanged

    resources = defs.resources
    config = IndexConfig(**index_config)
    model = resources["model"]
    return current_if_unchanged(
        resources["warehouse"],
        resources["index_store"],
        model_fingerprint=model.model_fingerprint(),
        dimension=model.dimension(),
        settings=config.to_settings(),
    )


def _sources_still_running(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Sources with chunks lacking vectors whose ingest run is still going in another live process.

    Empty when nothing is missing or when anything missing has no run in progress (then the index
    build itself fails with the reason, as it should).
    """
    from embedding_assets.stages.faiss_index import missing_vectors

    missing = missing_vectors(defs.resources["warehouse"], defs.resources["model"].model_fingerprint())
    if not missing:
        return []
    return sorted(missing) if covers(ingests_in_flight(instance), missing) else []
