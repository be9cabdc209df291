"""The sources sensor: new or changed source folders become ``ingest_source`` runs.

Each tick lists the source folders under the sources root and fingerprints each one from file
metadata only (relative path, size, mtime_ns; no file is opened), so a tick over 10,000 files takes a
fraction of a second. The ingest run itself hashes only files whose size or mtime moved.

- a folder without a dynamic partition: the partition is added and a run requested;
- a folder whose fingerprint differs from the cursor's: a run for that partition only;
- a folder with the cursor's fingerprint: nothing;
- a partition whose folder is gone (or that was added by mistake in the UI): reported on every tick and
  in the ``source_folders_exist`` check, never deleted by the sensor; remove it with the ``remove_source``
  job (CLI ``embedding-pipeline remove-source NAME`` runs the same job);
- a partition the cursor does not know (ingested from the UI or the CLI): compared with the folder
  fingerprint its last ``raw_documents`` run recorded, so turning the sensor on re-runs nothing unchanged.

The run key is ``{source}:{fingerprint}``: the same folder state never triggers twice, even when the
cursor is lost. The cursor is JSON ``{source: fingerprint}`` and survives daemon restarts.

``index_freshness_sensor`` evaluates ``faiss_index``'s automation condition: once an ingest changed the live
set (and no ingest or build is in progress) it requests a new index version. Both run by default wherever
the Dagster daemon runs (``make ui``), so a saved file becomes searchable without a person stepping in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from embedding_assets.assets import faiss_index
from embedding_assets.core.source_fingerprint import EMPTY_SOURCE, source_fingerprint
from embedding_assets.jobs import ingest_source_job
from embedding_assets.partitions import SOURCES_PARTITIONS_NAME
from embedding_assets.settings import Settings
from resources import DocumentSourcesResource

@dataclass
class TickPlan:
    """What one tick does: partitions to add, sources to run, folders gone, folders not ready, next cursor."""

    new_sources: list[str] = field(default_factory=list)
    changed_sources: list[str] = field(default_factory=list)
    removed_sources: list[str] = field(default_factory=list)
    empty_sources: list[str] = field(default_factory=list)
    cursor: dict[str, str] = field(default_factory=dict)


def plan_tick(previous: dict[str, str], current: dict[str, str], partitions: set[str]) -> TickPlan:
    """Compare folder fingerprints with the cursor and the existing partitions.

    ``previous``: cursor {source: fingerprint}; ``current``: fingerprints of the folders now present;
    ``partitions``: dynamic partitions that exist. A partition without a cursor entry (added by the CLI,
    or a lost cursor) counts as changed: its run key still keeps a state from running twice.
    """
    plan = TickPlan()
    for source, fp in sorted(current.items()):
        if fp == EMPTY_SOURCE:
            plan.empty_sources.append(source)
            continue
        plan.cursor[source] = fp
        if source not in partitions:
            plan.new_sources.append(source)
        elif previous.get(source) != fp:
            plan.changed_sources.append(source)
    plan.removed_sources = sorted((partitions | set(previous)) - set(current))
    return plan


def parse_cursor(cursor: str | None) -> dict[str, str]:
    """The sensor cursor as {source: fingerprint}; an unreadable cursor counts as empty (run keys still dedupe)."""
    if not cursor:
        return {}
    try:
        value = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def run_key(source: str, fingerprint: str) -> str:
    return f"{source}:{fingerprint}"


# Cursor entry holding the partitions last reported without a folder ("/" cannot be in a source name).
MISSING_KEY = "/missing"
SOURCE_FOLDERS_CHECK = "source_folders_exist"
RAW_DOCUMENTS = dg.AssetKey("raw_documents")


def missing_folder_message(names: list[str], root: Path) -> str:
    """What a person reads about partitions without a folder, and what to do about each."""
    return (
        f"partitions without a folder under {root}: {', '.join(names)} (the folder was deleted or moved, or the "
        "partition was added by mistake). Nothing is deleted automatically: their rows and vectors stay until you "
        "remove each one with the remove_source job (Jobs > remove_source > Launchpad, pick the partition) or "
        "`embedding-pipeline remove-source NAME`"
    )


def ingested_fingerprints(instance: dg.DagsterInstance, sources: list[str]) -> dict[str, str]:
    """The folder fingerprint each source had when its last ``raw_documents`` run started (UI, CLI or sensor run),
    for sources the cursor does not know: a source ingested outside the sensor is not ingested again unchanged."""
    known = {}
    for source in sources:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=RAW_DOCUMENTS, asset_partitions=[source]), limit=1
        ).records
        mat = records[0].asset_materialization if records else None
        value = mat.metadata.get("source_fingerprint") if mat is not None else None
        if value is not None:
            known[source] = str(value.value)
    return known


def source_folders_evaluation(missing: list[str], root: Path) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=RAW_DOCUMENTS, check_name=SOURCE_FOLDERS_CHECK, passed=not missing,
        severity=dg.AssetCheckSeverity.WARN,
        description=missing_folder_message(missing, root) if missing else f"every partition has its folder under {root}",
        metadata={"partitions_without_folder": dg.MetadataValue.json(missing), "sources_root": str(root)},
    )


@dg.asset_check(
    asset=RAW_DOCUMENTS,
    name=SOURCE_FOLDERS_CHECK,
    description=(
        "Every source partition has its folder under the sources root. The sources sensor records this check "
        "whenever the set of partitions without a folder changes; it can also be executed from the UI."
    ),
)
def source_folders_check(context, sources: DocumentSourcesResource) -> dg.AssetCheckResult:
    partitions = set(context.instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME))
    present = set(sources.source_names()) if sources.root_path.is_dir() else set()
    missing = sorted(partitions - present)
    evaluation = source_folders_evaluation(missing, sources.root_path)
    return dg.AssetCheckResult(
        passed=evaluation.passed, severity=evaluation.severity, description=evaluation.description,
        metadata=evaluation.metadata,
    )


def build_sources_sensor(interval_seconds: int) -> dg.SensorDefinition:
    """The sources sensor, ticking every ``interval_seconds`` (EMBEDDING_SENSOR_INTERVAL_SECONDS)."""

    @dg.sensor(
        job=ingest_source_job,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Watches the sources root (EMBEDDING_SOURCES_DIR): a new folder adds a partition and runs ingest_source for it; "
            "a changed folder (files added, edited, deleted) runs that partition only. Removed folders are reported, not "
            "deleted: remove each with the remove_source job (or `embedding-pipeline remove-source NAME`); they are "
            "reported on every tick and in the source_folders_exist check. Running by default wherever the daemon runs."
        ),
    )
    def sources_sensor(context: dg.SensorEvaluationContext, sources: DocumentSourcesResource) -> dg.SensorResult | dg.SkipReason:
        root = sources.root_path
        if not root.is_dir():
            return dg.SkipReason(f"sources root {root} does not exist (EMBEDDING_SOURCES_DIR)")
        current: dict[str, str] = {}
        for name in sources.source_names():
            try:
                current[name] = source_fingerprint(root / name)
            except OSError as exc:  # vanished or unreadable between listing and walking: retry next tick
                context.log.warning(f"cannot read source folder {root / name}: {exc}")
        previous = parse_cursor(context.cursor)
        reported_missing = previous.pop(MISSING_KEY, "")
        partitions = set(context.instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME))
        unknown = sorted(partitions & set(current) - set(previous))
        previous.update(ingested_fingerprints(context.instance, unknown) if unknown else {})
        plan = plan_tick(previous, current, partitions)

        notes = []
        if plan.removed_sources:
            notes.append(missing_folder_message(plan.removed_sources, root))
        missing_now = ",".join(plan.removed_sources)
        asset_events = [source_folders_evaluation(plan.removed_sources, root)] if missing_now != reported_missing else []
        cursor = dict(plan.cursor)
        if missing_now:
            cursor[MISSING_KEY] = missing_now
        if plan.empty_sources:
            notes.append("empty source folders waiting for files: " + ", ".join(plan.empty_sources))
        for note in notes:
            context.log.warning(note)

        run_requests = [
            dg.RunRequest(
                run_key=run_key(source, plan.cursor[source]),
                partition_key=source,
                tags={"embedding/source_fingerprint": plan.cursor[source], "embedding/trigger": "new" if source in plan.new_sources else "changed"},
            )
            for source in plan.new_sources + plan.changed_sources
        ]
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [sources_partitions_request(plan.new_sources)] if plan.new_sources else []
            ),
            cursor=json.dumps(cursor, sort_keys=True),
            asset_events=asset_events,
            skip_reason=None if run_requests else ("; ".join(notes) or f"no source under {root} changed"),
        )

    return sources_sensor


def sources_partitions_request(names: list[str]) -> dg.AddDynamicPartitionsRequest:
    return dg.AddDynamicPartitionsRequest(partitions_def_name=SOURCES_PARTITIONS_NAME, partition_keys=names)


def build_index_freshness_sensor(interval_seconds: int) -> dg.AutomationConditionSensorDefinition:
    """The automation sensor of faiss_index, ticking every ``interval_seconds`` (EMBEDDING_AUTOMATION_INTERVAL_SECONDS)."""
    return dg.AutomationConditionSensorDefinition(
        "index_freshness_sensor",
        target=dg.AssetSelection.assets(faiss_index),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval_seconds,
        description=(
            "Requests a new faiss_index version after an ingest changed the live set (its automation condition), never "
            "while an ingest or another build is in progress. Running by default wherever the daemon runs."
        ),
    )


# The sensors with the default intervals (importable without reading the environment); the code location
# builds its own from the settings (``definitions.build_definitions``).
sources_sensor = build_sources_sensor(Settings.model_fields["sensor_interval_seconds"].default)
index_freshness_sensor = build_index_freshness_sensor(Settings.model_fields["automation_interval_seconds"].default)
