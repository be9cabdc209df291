"""The asset graph as a reviewer sees it: keys, deps, partitions, checks, kinds, owners, tags, pools and
code versions of the default settings, against the checked-in tests/snapshots/asset_specs.json.

A change to the graph shows in review as a change to that file. After an intended change, rewrite it:
``UPDATE_SNAPSHOTS=1 python -m pytest tests/test_definitions_snapshot.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from embedding_assets.definitions import build_definitions
from embedding_assets.settings import Settings

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_specs.json"


def asset_specs_snapshot(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": (
                {"type": type(partitions).__name__, "name": getattr(partitions, "name", None)} if partitions else None
            ),
            "checks": sorted(c.name for c in node.check_keys),
            "kinds": sorted(node.kinds),
            "owners": list(node.owners),
            "tags": {k: v for k, v in sorted(node.tags.items()) if not k.startswith("dagster/kind/")},
            "pools": sorted(node.pools or []),
            "code_version": node.code_version,
            "automation_condition": node.automation_condition.get_label() if node.automation_condition else None,
        }
    return {
        "assets": assets,
        "jobs": sorted(job.name for job in defs.jobs or []),
        "sensors": sorted(s.name for s in defs.sensors or []),
        "schedules": sorted(s.name for s in defs.schedules or []),
    }


def test_asset_specs_match_the_snapshot(tmp_path):
    # Fixed settings (the defaults, other homes): code versions must not depend on who runs the test.
    settings = Settings.model_construct(home=tmp_path / "home", sources_dir=tmp_path / "sources")  # no environment
    snapshot = asset_specs_snapshot(build_definitions(settings=settings))
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(snapshot, indent=2, sort_keys=True) + "\n")
    assert snapshot == json.loads(SNAPSHOT.read_text()), "graph changed: review, then UPDATE_SNAPSHOTS=1"


def test_code_versions_move_with_the_settings_that_change_output(tmp_path):
    base = Settings.model_construct(home=tmp_path, sources_dir=tmp_path)
    before = asset_specs_snapshot(build_definitions(settings=base))["assets"]

    def changed(**overrides) -> set[str]:
        after = asset_specs_snapshot(build_definitions(settings=base.model_copy(update=overrides)))["assets"]
        return {name for name in before if before[name]["code_version"] != after[name]["code_version"]}

    assert changed(chunk_tokens=120) == {"chunks"}
    assert changed(dedup_threshold=0.9) == {"deduped_chunks"}
    assert changed(dtype="float32") == {"embeddings", "quantized_embeddings"}
    assert changed(index_layout="int8") == {"faiss_index"}
    assert changed(max_file_bytes=1024) == {"raw_documents"}
    assert changed(batch_size=8, lru_entries=10, cpu_threads=1) == set(), "run-time knobs change no output"
