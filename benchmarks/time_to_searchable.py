"""Time from a file saved under a source to its text being found by search, with `make ui`'s defaults.

    python -m benchmarks.time_to_searchable [--rounds 2] [--port 3111]

Starts `dagster dev -w workspace.yaml` on 127.0.0.1 exactly as `make ui` does (its daemon runs the sources
sensor and the index freshness sensor, both on by default, at their default intervals) over a fresh home
with the bundled sample source, waits until the sample is indexed, then saves a new Markdown file with a
unique sentence and polls search (in this process, reading the published version like `search` does) until
the sentence is the top hit. Prints one JSON line per round and the median. Stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=3111)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="time-to-searchable-"))
    home, sources = tmp / "home", tmp / "sources"
    shutil.copytree(REPO / "data" / "sources" / "sample", sources / "sample")
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "EMBEDDING_HOME": str(home), "EMBEDDING_SOURCES_DIR": str(sources),
           "DAGSTER_HOME": str(home / "dagster")}
    for name in ("EMBEDDING_SENSOR_INTERVAL_SECONDS", "EMBEDDING_AUTOMATION_INTERVAL_SECONDS"):
        env.pop(name, None)  # the defaults are what is measured
    os.environ.update({k: env[k] for k in ("EMBEDDING_HOME", "EMBEDDING_SOURCES_DIR")})
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    ui = subprocess.Popen([dagster, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(args.port)],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "dagster.log", "w"),
                          start_new_session=True)
    try:
        from embedding_assets.search import search
        from embedding_assets.settings import index_store_resource, model_resource
        from resources.index_store import IndexStoreError

        model, store = model_resource(), index_store_resource()
        model.encode(["warm up"])  # the query model is loaded before the clock starts

        def top_hit(query: str):
            try:
                hits = search(query, 1, model=model, index_store=store)
            except IndexStoreError:
                return None
            return hits[0] if hits else None

        started = time.monotonic()
        wait_for(lambda: _up(args.port), 180, "the Dagster UI")
        wait_for(lambda: top_hit("coffee machine"), 600, "the sample source to be indexed", poll=2)
        print(json.dumps({"event": "sample indexed", "seconds_since_start": round(time.monotonic() - started, 1)}))
        rounds = []
        for number in range(args.rounds):
            word = f"zephyrine{uuid.uuid4().hex[:6]}"
            sentence = f"The {word} valve on the rooftop rain gauge must be bled every equinox before calibration."
            saved = time.monotonic()
            (sources / "sample" / f"note-{number}.md").write_text(f"# Rain gauge {word}\n\n{sentence}\n")
            hit = wait_for(lambda: (h := top_hit(f"{word} valve rain gauge")) and word in h.text and h, 900,
                           "the new text to be found", poll=1)
            seconds = round(time.monotonic() - saved, 1)
            rounds.append(seconds)
            print(json.dumps({"round": number + 1, "seconds_to_searchable": seconds, "doc_path": hit.doc_path}))
            time.sleep(5)
        print(json.dumps({"median_seconds_to_searchable": statistics.median(rounds), "rounds": rounds,
                          "sensor_interval_s": 30, "automation_interval_s": 15}))
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
