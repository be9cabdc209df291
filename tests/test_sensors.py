"""The sources sensor against a real temporary Dagster instance (build_sensor_context, real folders)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.partitions import SOURCES_PARTITIONS_NAME
from embedding_assets.sensors import EMPTY_SOURCE, plan_tick, source_fingerprint, sources_sensor
from resources import DocumentSourcesResource
from tests.pipeline_support import FIXTURE_CORPUS


@pytest.fixture(scope="module")
def shared_instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def instance(shared_instance):
    """The module's instance with no source partitions (creating an instance per test costs seconds)."""
    for name in shared_instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME):
        shared_instance.delete_dynamic_partition(SOURCES_PARTITIONS_NAME, name)
    return shared_instance


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "sources"
    shutil.copytree(FIXTURE_CORPUS / "alpha", root / "alpha")
    return root


def tick(instance: dg.DagsterInstance, root: Path, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    """One evaluation the way the daemon does it: a fresh context, then partition requests applied."""
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"sources": DocumentSourcesResource(root=str(root))}
    )
    result = sources_sensor(context)
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def requested(result) -> dict[str, str]:
    return {r.partition_key: r.run_key for r in result.run_requests} if isinstance(result, dg.SensorResult) else {}


def skip_text(result) -> str:
    reason = result if isinstance(result, dg.SkipReason) else result.skip_reason
    return reason.skip_message if reason else ""


def bump(path: Path, text: str) -> None:
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # coarse-mtime filesystems


def test_new_source_adds_partition_and_requests_its_run(instance, root):
    result = tick(instance, root, None)
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [["alpha"]]
    fp = source_fingerprint(root / "alpha")
    assert requested(result) == {"alpha": f"alpha:{fp}"}
    assert json.loads(result.cursor) == {"alpha": fp}
    assert instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME) == ["alpha"]


def test_unchanged_then_changed_then_cursor_survives(instance, root):
    first = tick(instance, root, None)
    shutil.copytree(FIXTURE_CORPUS / "beta", root / "beta")
    second = tick(instance, root, first.cursor)  # a new context with the saved cursor, like a restarted daemon
    assert set(requested(second)) == {"beta"}, "alpha is unchanged, only the new source runs"
    third = tick(instance, root, second.cursor)
    assert requested(third) == {} and "no source" in skip_text(third)

    bump(root / "alpha" / "tide-pools.html", "<html><body><p>Edited tide pools.</p></body></html>")
    edited = tick(instance, root, third.cursor)
    assert set(requested(edited)) == {"alpha"} and edited.dynamic_partitions_requests == []
    assert requested(edited)["alpha"] != requested(first)["alpha"]

    (root / "alpha" / "new-note.md").write_text("# New\n\nA new file.\n")
    added = tick(instance, root, edited.cursor)
    assert set(requested(added)) == {"alpha"}
    (root / "alpha" / "new-note.md").unlink()
    deleted = tick(instance, root, added.cursor)
    assert requested(deleted) == {"alpha": requested(edited)["alpha"]}, "same folder state -> same run key"

    # A lost cursor asks again, with the run key of the state already run: Dagster will not launch it twice.
    lost = tick(instance, root, None)
    assert requested(lost) == {"alpha": requested(deleted)["alpha"], "beta": requested(second)["beta"]}


def test_removed_folder_is_reported_not_deleted(instance, root):
    first = tick(instance, root, None)
    shutil.rmtree(root / "alpha")
    result = tick(instance, root, first.cursor)
    assert requested(result) == {}
    assert "alpha" in skip_text(result) and "remove-source" in skip_text(result)
    assert not result.dynamic_partitions_requests
    assert instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME) == ["alpha"]
    again = tick(instance, root, result.cursor)  # reported on every tick until removed
    assert "alpha" in skip_text(again)


def test_empty_folder_waits_and_missing_root_skips(instance, root, tmp_path):
    (root / "incoming").mkdir()
    result = tick(instance, root, None)
    assert set(requested(result)) == {"alpha"} and "incoming" not in json.loads(result.cursor)
    assert source_fingerprint(root / "incoming") == EMPTY_SOURCE
    missing = tick(instance, tmp_path / "nowhere", None)
    assert "does not exist" in skip_text(missing)


def test_plan_tick_treats_partition_without_cursor_entry_as_changed():
    plan = plan_tick({"a": "1"}, {"a": "1", "b": "2", "c": EMPTY_SOURCE}, {"a", "b", "gone"})
    assert (plan.new_sources, plan.changed_sources, plan.removed_sources, plan.empty_sources) == ([], ["b"], ["gone"], ["c"])
    assert plan.cursor == {"a": "1", "b": "2"}


def test_tick_on_ten_thousand_files_is_fast(instance, tmp_path):
    root = tmp_path / "sources"
    for i in range(10_000):
        folder = root / "big" / f"d{i // 500:02d}"
        if i % 500 == 0:
            folder.mkdir(parents=True)
        (folder / f"note-{i:05d}.txt").write_text(f"note {i}\n")
    started = time.perf_counter()
    first = tick(instance, root, None)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    unchanged = tick(instance, root, first.cursor)
    warm = time.perf_counter() - started
    print(f"\nsensor tick over 10,000 files: first {cold:.3f} s, unchanged {warm:.3f} s")
    assert set(requested(first)) == {"big"} and requested(unchanged) == {}
    assert cold < 10 and warm < 10, "a tick must stay well under Dagster's 60 s limit"
