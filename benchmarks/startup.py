"""Start-up cost: importing the code location, and an unchanged re-run through the CLI against its full run.

    python -m benchmarks.startup [--docs 114] [--corpus DIR] [--imports 5] [--reruns 3]

1. ``python -c "import embedding_assets.definitions"`` in a fresh interpreter, ``--imports`` times (median),
   and which heavy libraries that import loaded (torch, sentence-transformers and transformers must not be).
2. On the first ``--docs`` pages of Debian's python3.11-doc HTML (``apt-get install python3.11-doc``),
   copied into a temporary source under a temporary home: ``embedding-pipeline materialize`` (full run,
   cold caches) and then the same command again with nothing changed, ``--reruns`` times (the median is
   reported), each a new process timed from start to exit (CLI wall time: interpreter, imports, Dagster
   instance, the run, the report).

Prints the import time, both wall times and their ratio (goal: unchanged / full <= 0.03).
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


def cli_run(env: dict[str, str]) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "embedding_assets.cli", "materialize", "--json"], env=env,
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
        reruns = [cli_run(env) for _ in range(max(1, args.reruns))]
    times = [seconds for seconds, _ in reruns]
    again, report_again = statistics.median(times), reruns[-1][1]
    print(f"{len(copied)} pages; full run {full:.1f} s, unchanged re-run {again:.2f} s (median of "
          f"{len(times)}: {', '.join(f'{t:.2f}' for t in times)}): ratio {again / full:.4f} (goal <= 0.03)")
    print(json.dumps({"full": report, "unchanged": report_again}, default=str)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
