"""Run the jobs in-process against a Dagster instance and collect their reports.

Used by the CLI and the tests: runs are recorded in the instance like any other run, so they show
in the UI's run history when the instance is the UI's (``DAGSTER_HOME``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import dagster as dg

from embedding_assets.core.sources import SourceMissing
from embedding_assets.partitions import SOURCES_PARTITIONS_NAME

# Which process runs an in-process job: a run whose process died (SIGKILL, OOM, power cut) would stay
# "in progress" forever, and the index's automation condition waits while any ingest is in progress.
PID_TAG = "embedding_pipeline/pid"
HOST_TAG = "embedding_pipeline/host"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]

# Dagster's console logger prints a failed step with its stack trace at ERROR level. A failure already
# reaches the caller as RunFailed with its cause (the CLI prints one line for an expected one, the stack
# trace for a bug), and the run's event log keeps the whole trace for the UI; so quiet runs print nothing.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


class RunFailed(RuntimeError):
    """A job failed; ``cause`` is the user-code exception when there was one, ``source`` the partition."""

    def __init__(self, message: str, cause: BaseException | None = None, source: str | None = None):
        super().__init__(message)
        self.cause = cause
        self.source = source


class StepFailedOnWorker(RuntimeError):
    """A step failed on a Celery worker: only its exception's class name and message came back."""

    def __init__(self, message: str, error_class: str):
        super().__init__(message)
        self.error_class = error_class


def ensure_partitions(instance: dg.DagsterInstance, names: list[str]) -> list[str]:
    """Add the dynamic partitions of ``names`` that do not exist yet; returns those this call added."""
    new = [n for n in names if not instance.has_dynamic_partition(SOURCES_PARTITIONS_NAME, n)]
    if not new:
        return []
    try:
        instance.add_dynamic_partitions(SOURCES_PARTITIONS_NAME, new)
    except Exception:  # another process added them between the check and the insert (unique key)
        if not all(instance.has_dynamic_partition(SOURCES_PARTITIONS_NAME, n) for n in new):
            raise
        return []  # theirs, not ours: never removed by this call
    return new


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
    A partition this call added is removed again when the run fails because the source folder does not
    exist (a mistyped name leaves nothing behind); a partition that existed before is never removed.
    """
    added = ensure_partitions(instance, [source])
    run_config: dict[str, Any] = dict(QUIET) if quiet else {}
    ops = {name: {"config": config} for name, config in (op_config or {}).items()}
    if allow_empty:
        ops.setdefault("raw_documents", {"config": {}})["config"]["allow_empty"] = True
    if ops:
        run_config["ops"] = ops
    try:
        return _execute(defs.resolve_job_def("ingest_source"), instance, run_config, partition_key=source)
    except RunFailed as failed:
        # Stage 1 refused before writing anything: SourceMissing, or the asset's Failure that explains it.
        if added and (isinstance(failed.cause, SourceMissing) or isinstance(failed.cause, dg.Failure)):
            instance.delete_dynamic_partition(SOURCES_PARTITIONS_NAME, source)
        raise


def materialize_index(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *,
    quiet: bool = True,
    index_config: dict | None = None,
    skip_if_current: bool = False,
) -> dict[str, Any]:
    """Build and publish the index from one snapshot of the live set; returns the faiss_index metadata.

    With ``skip_if_current``, no run is launched when the published version already holds exactly the
    live set with the same model and settings; its manifest is returned instead. Raises RunFailed.
    """
    if skip_if_current:
        try:
            published = _current_index_if_unchanged(defs, index_config or {})
        except Exception as exc:  # noqa: BLE001 - same contract as a failed run: RunFailed with the cause
            raise RunFailed(f"{type(exc).__name__}: {exc}", exc) from exc
        if published is not None:
            m = published.manifest
            return {
                "build_mode": "unchanged", "run_skipped": True, "version": published.version, "layout": m["layout"],
                "row_count": m["count"], "nlist": m["nlist"], "nprobe": m["nprobe"],
                "rescore_multiplier": m.get("rescore_multiplier", 1), "recall_at_10": round(m["recall_at_k"], 4),
                "vectors_added": 0, "vectors_removed": 0, "seconds": 0.0,
            }
    run_config: dict[str, Any] = dict(QUIET) if quiet else {}
    if index_config:
        run_config["ops"] = {"faiss_index": {"config": index_config}}
    return _execute(defs.resolve_job_def("build_index"), instance, run_config)["faiss_index"]


def remove_source_run(defs: dg.Definitions, instance: dg.DagsterInstance, name: str, *, quiet: bool = True) -> dict[str, Any]:
    """Run the ``remove_source`` job (the one the UI launches) for partition ``name``; its summary.

    Raises RunFailed with the job's failure (``SourceRemovalError``'s message: the folder still exists, or
    no such source) as its cause.
    """
    run_config: dict[str, Any] = dict(QUIET) if quiet else {}
    release_dead_runs(instance)
    try:
        result = defs.resolve_job_def("remove_source").execute_in_process(
            instance=instance, run_config=run_config, partition_key=name, tags=run_tags(), raise_on_error=False
        )
    except Exception as exc:  # noqa: BLE001 - e.g. a partition key that does not exist; Dagster's types vary
        raise RunFailed(f"{type(exc).__name__} (source {name}): {exc}", exc, name) from exc
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        error = failure.step_failure_data.error if failure is not None else None
        message = (error.message.strip() if error else "the remove_source run failed").splitlines()[0]
        message = message.removeprefix("dagster._core.definitions.events.Failure: ")
        raise RunFailed(message, RuntimeError(message), name)
    return result.output_for_node("remove_source_partition")


def _execute(job, instance, run_config, partition_key: str | None = None) -> dict[str, dict[str, Any]]:
    release_dead_runs(instance)
    tags = run_tags()
    from embedding_assets.cluster.executor import executor_name

    if executor_name() == "celery":
        return _execute_on_workers(job.name, instance, run_config, partition_key, tags)
    try:
        result = job.execute_in_process(instance=instance, run_config=run_config, partition_key=partition_key, tags=tags)
    except Exception as exc:  # noqa: BLE001 - execute_in_process re-raises the user code's own exception
        cause = getattr(exc, "user_exception", None) or exc
        where = f" (source {partition_key})" if partition_key else ""
        raise RunFailed(f"{type(cause).__name__}{where}: {cause}", cause, partition_key) from exc
    return materializations(result)


def _execute_on_workers(job_name: str, instance, run_config, partition_key, tags) -> dict[str, dict[str, Any]]:
    """Run the code location's job through its Celery executor: this process submits the steps and waits;
    the workers run them (they rebuild the job from ``embedding_assets.definitions``)."""
    from embedding_assets import definitions

    recon = dg.reconstructable(definitions.INGEST_JOB if job_name == "ingest_source" else definitions.INDEX_JOB)
    if partition_key is not None:
        tags = {**tags, "dagster/partition": partition_key}
    with dg.execute_job(recon, instance=instance, run_config=run_config, tags=tags) as result:
        if not result.success:
            failure = next((e for e in result.all_events if e.is_step_failure), None)
            error = _user_error(failure.step_failure_data.error) if failure else None
            cause = error.message.strip() if error else "the run failed"
            where = f" (source {partition_key})" if partition_key else ""
            remote = StepFailedOnWorker(cause, error.cls_name) if error else None
            raise RunFailed(f"run {result.run_id}{where}: {cause}", remote, partition_key)
        return materializations(result)


def _user_error(error):
    """The user code's own error inside Dagster's wrappers (DagsterExecutionStepExecutionError -> cause)."""
    while error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error


def materializations(result) -> dict[str, dict[str, Any]]:
    """{asset key: metadata values} of a run's materializations; dagster/row_count becomes row_count."""
    out: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out[mat.asset_key.to_user_string()] = {
            key.removeprefix("dagster/"): _plain(value.value) for key, value in mat.metadata.items()
        }
    return out


def _plain(value: Any) -> Any:
    """A metadata value as plain data for ``json.dumps`` of the CLI's report: Dagster's table records refuse
    iteration, so a column schema becomes {column: type}, a table its list of rows, a row its dict."""
    if isinstance(value, dg.TableSchema):
        return {column.name: column.type for column in value.columns}
    if isinstance(value, dg.TableRecord):
        return dict(value.data)
    if isinstance(value, dg.TableMetadataValue):
        return [dict(record.data) for record in value.records]
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


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


def run_tags() -> dict[str, str]:
    """Tags that let :func:`release_dead_runs` tell a live in-process run from a dead one."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def release_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark in-process runs of this host whose process is gone as failed and free their pool slots.

    Returns the ids of the runs released. Only runs tagged by :func:`run_tags` are considered, so runs
    launched by ``dagster dev`` (watched by its own run monitoring) are never touched.
    """
    host = socket.gethostname()
    released = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: host})):
        pid = int(run.tags.get(PID_TAG, "0"))
        if pid <= 0 or pid == os.getpid() or _process_alive(pid):
            continue
        instance.report_run_failed(run, f"process {pid} that ran it on {host} is gone (killed or crashed)")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
