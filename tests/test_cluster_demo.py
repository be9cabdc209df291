"""`make cluster-demo` end to end: real PostgreSQL, Redis and two Celery workers; the result equals embedded mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cluster_demo_fans_steps_out_to_both_workers_and_equals_embedded_mode(postgres_server):
    # postgres_server: skips with its reason where the server binaries are missing (the demo starts its own).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "embedding_assets.cluster.demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    assert report["equal_to_embedded"] is True, report["differences"]
    assert set(report["workers"]) == {"worker-1", "worker-2"} and all(report["workers"].values()), report["workers"]
    steps = [step for steps in report["workers"].values() for step in steps]
    assert steps.count("embeddings") == 6 and steps.count("faiss_index") == 1
    assert report["vectors"] > 0
