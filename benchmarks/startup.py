"""Start-up cost: importing the code location, and an unchanged re-run through the CLI against its full run.

    python -m benchmarks.startup [--docs 114] [--corpus DIR] [--imports 5] [--reruns 3]

1. ``python -c "import embedding_assets.definitions"`` in a fresh interpreter, ``--imports`` times (median),
   and which heavy libraries that import loaded (torch, sentence-transformers and transformers must not be).
2. On the first ``--docs`` pages of Debian's python3.11-doc HTML (``apt-get install python3.11-doc``),
   copied into a temporary source under a temporary home: ``embedding-pipeline materialize`` (full run,
   cold caches), then with nothing changed ``--reruns`` times ``materialize --full-check`` (every job
   runs and finds nothing to do: the first unchanged re-run after any change costs this) and
   ``--reruns`` times ``materialize`` (the state the full checks proved settled is remembered: no Dagster,
   embedding_assets/unchanged.py). Each is a new process timed from start to exit (CLI wall time:
   interpreter, imports, Dagster instance, the run, the report); medians are reported.

Prints the import time, the wall times and their ratios to the full run (goal: unchanged / full <= 0.03).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.incremental import DEFAULT_CORPUS, copy_corpus

HEAVY = ("torch", "sentence_transformers", "transformers", "faiss", "duckdb", "pyarrow", "bm25s", "psycopg", "celery")
PROBE = (
    "import sys, time; t = time.perf_counter(); import embedding_assets.definitions; "
    "print(time.perf_counter() - t); print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
)


def import_time(runs: int) -> tuple[float, float, list[str]]:
    """(median wall s of the whole interpreter, median s of the import itself, heavy modules loaded)."""
    walls, inner, loaded = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split("\n")
        walls.append(time.perf_counter() - start)
        inner.append(float(out[0]))
        loaded = [m for m in out[1].split(",") if m]
    return statistics.median(walls), statistics.median(inner), loaded


def cli_run(env: dict[str, str], *args: str) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embedding_assets.cli", "materialize", "--json", *args], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"materialize failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=114)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--imports", type=int, default=5)
    parser.add_argument("--reruns", type=int, default=3)
    args = parser.parse_args(argv)

    wall, inner, loaded = import_time(args.imports)
    print(f"import embedding_assets.definitions: {inner:.2f} s (interpreter + import {wall:.2f} s, median of "
          f"{args.imports}); heavy modules loaded: {', '.join(loaded) or 'none'}")
    if not args.corpus.is_dir():
        print(f"{args.corpus} not found: apt-get install python3.11-doc, or pass --corpus")
        return 1
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        root = Path(tmp)
        copied = copy_corpus(args.corpus, root / "sources" / "pydocs", args.docs)
        env = {**os.environ, "EMBEDDING_HOME": str(root / "home"), "EMBEDDING_SOURCES_DIR": str(root / "sources"),
               "DAGSTER_HOME": str(root / "dagster")}  # fmt: skip
        (root / "dagster").mkdir()
        full, report = cli_run(env)
        checks = [cli_run(env, "--full-check") for _ in range(max(1, args.reruns))]
        remembered = [cli_run(env) for _ in range(max(1, args.reruns))]
    pages = len(copied)
    print(f"{pages} pages; full run {full:.1f} s")
    for label, runs in (("unchanged re-run, full check (--full-check)", checks), ("unchanged re-run, remembered", remembered)):
        times = [seconds for seconds, _ in runs]
        median = statistics.median(times)
        taken = sum(bool(r["shortcut"]["taken"]) for _, r in runs)
        print(f"{label}: {median:.2f} s (median of {', '.join(f'{t:.2f}' for t in times)}; Dagster skipped in "
              f"{taken} of {len(runs)}): ratio {median / full:.4f} (goal <= 0.03)")
    print(json.dumps({"full": report, "full_check": checks[-1][1], "remembered": remembered[-1][1]}, default=str)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
