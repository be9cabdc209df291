"""The sources sensor: new or changed source folders become ``ingest_source`` runs.

Each tick lists the source folders under the sources root and fingerprints each one from file
metadata only (relative path, size, mtime_ns; no file is opened), so a tick over 10,000 files takes a
fraction of a second. The ingest run itself hashes only files whose size or mtime moved.

- a folder without a dynamic partition: the partition is added and a run requested;
- a folder whose fingerprint differs from the cursor's: a run for that partition only;
- a folder with the cursor's fingerprint: nothing;
- a partition whose folder is gone: reported on every tick, never deleted by the sensor; remove it
  with ``embedding_assets.stages.remove_source.remove_source`` (CLI ``embedding-pipeline remove-source NAME``).

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

from embedding_assets.core.identity import sha256_hex
from embedding_assets.assets import faiss_index
from embedding_assets.core.sources import metadata_lines
from embedding_assets.jobs import ingest_source_job
from embedding_assets.partitions import SOURCES_PARTITIONS_NAME
from embedding_assets.settings import env_int
from resources import DocumentSourcesResource

EMPTY_SOURCE = "empty"  # fingerprint of a folder without files: never ingested (a half-created folder)


def source_fingerprint(folder: Path) -> str:
    """Fingerprint of a source folder's file metadata: sha256 over sorted ``relative path, size, mtime_ns, mode``.

    Walks exactly what ``core.sources.scan_source`` walks (``metadata_lines`` over ``walk_source``: hidden paths ignored,
    symlinked folders not followed, names that are not UTF-8 escaped), so the sensor and the run agree
    on what a source holds. Paths that are refused or cannot be read (a folder without permission, a
    symlink loop) enter with their reason, so fixing one is a change and triggers a run; one stray
    path never stops the sensor from fingerprinting the rest. Returns ``EMPTY_SOURCE`` when the
    folder holds nothing. Raises OSError only when ``folder`` itself cannot be listed.
    """
    lines = metadata_lines(folder)
    if not lines:
        return EMPTY_SOURCE
    return sha256_hex("\n".join(lines))


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


@dg.sensor(
    job=ingest_source_job,
    minimum_interval_seconds=env_int("EMBEDDING_SENSOR_INTERVAL_SECONDS", 30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches the sources root (EMBEDDING_SOURCES_DIR): a new folder adds a partition and runs ingest_source for it; "
        "a changed folder (files added, edited, deleted) runs that partition only. Removed folders are reported, not "
        "deleted: run `embedding-pipeline remove-source NAME`. Running by default wherever the daemon runs."
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
    plan = plan_tick(parse_cursor(context.cursor), current, set(context.instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME)))

    notes = []
    if plan.removed_sources:
        notes.append(
            "source folders removed but still partitions (not deleted automatically): "
            + ", ".join(plan.removed_sources)
            + "; remove each with `embedding-pipeline remove-source NAME`"
        )
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
        cursor=json.dumps(plan.cursor, sort_keys=True),
        skip_reason=None if run_requests else ("; ".join(notes) or f"no source under {root} changed"),
    )


def sources_partitions_request(names: list[str]) -> dg.AddDynamicPartitionsRequest:
    return dg.AddDynamicPartitionsRequest(partitions_def_name=SOURCES_PARTITIONS_NAME, partition_keys=names)


index_freshness_sensor = dg.AutomationConditionSensorDefinition(
    "index_freshness_sensor",
    target=dg.AssetSelection.assets(faiss_index),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=env_int("EMBEDDING_AUTOMATION_INTERVAL_SECONDS", 15),
    description=(
        "Requests a new faiss_index version after an ingest changed the live set (its automation condition), never "
        "while an ingest or another build is in progress. Running by default wherever the daemon runs."
    ),
)
