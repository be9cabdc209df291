"""Which ingest runs are still in flight, across processes, read from the Dagster instance.

The index build reads every source's vectors. When another process is still embedding a source, the
build waits for that run instead of failing or publishing a half-updated corpus; when a run wrote
while the build was reading, the build starts again (see ``faiss_index``). Runs whose process died
are released first, so a SIGKILLed run never makes anyone wait.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable

import dagster as dg

# Which process runs a job: a run whose process died (SIGKILL, OOM, power cut) never frees the pool
# slot it holds, and with a pool limit every later run would wait for it forever.
PID_TAG = "embedding_pipeline/pid"
HOST_TAG = "embedding_pipeline/host"
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
ANY_SOURCE = "*"  # a backfill run over a range of sources
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


class IngestWaitTimeout(RuntimeError):
    pass


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


def ingests_in_flight(instance: dg.DagsterInstance, *, exclude_run_id: str | None = None) -> dict[str, list[str]]:
    """{source: [run id, ...]} of unfinished source-partitioned runs other than ``exclude_run_id``.

    A run over a range of sources is listed under :data:`ANY_SOURCE`. Unpartitioned runs (index
    builds) are not ingests and are left out.
    """
    release_dead_runs(instance)
    out: dict[str, list[str]] = {}
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED)):
        if run.run_id == exclude_run_id:
            continue
        source = run.tags.get(PARTITION_TAG) or (ANY_SOURCE if RANGE_START_TAG in run.tags else None)
        if source is not None:
            out.setdefault(source, []).append(run.run_id)
    return out


def covers(in_flight: dict[str, list[str]], sources: Iterable[str]) -> bool:
    """True when every source has a run in flight (a range run covers every source)."""
    return ANY_SOURCE in in_flight or all(s in in_flight for s in sources)


def wait_for_runs(
    instance: dg.DagsterInstance,
    run_ids: Iterable[str],
    *,
    timeout_seconds: float,
    poll_seconds: float = 1.0,
    on_wait: Callable[[int], None] = lambda n: None,
) -> None:
    """Block until none of ``run_ids`` is unfinished (or its process is gone); raises :class:`IngestWaitTimeout`."""
    waiting = set(run_ids)
    deadline = time.monotonic() + timeout_seconds
    while True:
        release_dead_runs(instance)
        waiting = {r.run_id for r in instance.get_runs(filters=dg.RunsFilter(run_ids=list(waiting), statuses=UNFINISHED))}
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise IngestWaitTimeout(
                f"waited {timeout_seconds:.0f} s for {len(waiting)} ingest run(s) still in flight: {', '.join(sorted(waiting))}"
            )
        on_wait(len(waiting))
        time.sleep(poll_seconds)
