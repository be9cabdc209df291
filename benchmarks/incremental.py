"""Incremental re-runs against a full run, on a real corpus, in one invocation.

    python -m benchmarks.incremental [--docs N] [--corpus DIR]

Corpus: Debian's python3.11-doc HTML pages (``apt-get install python3.11-doc``), copied into a
temporary source. Three timed phases through the real Dagster jobs (stages 1-6 for the source, then
the index), all in this process, on a temporary home and Dagster instance:

1. full run (the model is loaded before the clock starts, so the ratio is not flattered by load time);
2. unchanged re-run;
3. re-run after editing one paragraph in 1% of the files.

Prints the two ratios (re-run wall time / full-run wall time) and the work each run did.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

from embedding_assets.definitions import build_definitions
from embedding_assets.runner import materialize_index, materialize_source, source_summary
from resources import (
    DocumentSourcesResource,
    EmbeddingCacheResource,
    EmbeddingModelResource,
    IndexStoreResource,
    WarehouseResource,
)

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html")
SOURCE = "pydocs"


def copy_corpus(corpus: Path, target: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in corpus.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)
    if limit:
        files = files[:limit]
    copied = []
    for path in files:
        out = target / path.relative_to(corpus)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        copied.append(out)
    return copied


def edit_one_paragraph(path: Path, rng: random.Random) -> None:
    """Change the text of one paragraph, as an author fixing a sentence would."""
    html = path.read_text(encoding="utf-8", errors="replace")
    starts = [i for i in range(len(html)) if html.startswith("<p>", i)]
    at = rng.choice(starts) + 3 if starts else html.find("<body") + 6
    html = html[:at] + f"Revised note {rng.randrange(10**9)}: this sentence was edited for the benchmark. " + html[at:]
    path.write_text(html, encoding="utf-8")


def timed_run(defs, instance) -> tuple[float, dict, dict]:
    started = time.perf_counter()
    assets = materialize_source(defs, instance, SOURCE)
    index = materialize_index(defs, instance, skip_if_current=True)
    return time.perf_counter() - started, assets, index


def describe(name: str, seconds: float, assets: dict, index: dict) -> dict:
    summary = source_summary(assets)
    return {
        "phase": name,
        "seconds": round(seconds, 2),
        "documents": summary["documents"],
        "chunks": summary["chunks"],
        "embedded_by_model": summary["embedded_by_model"],
        "cache_hits": summary["cache_hits"],
        "index": {k: index.get(k) for k in ("build_mode", "row_count", "vectors_added", "vectors_removed", "nprobe", "recall_at_10")},
        "stage_seconds": summary["seconds"] | {"faiss_index": index.get("seconds")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=None, help="use only the first N pages (default: all)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--changed-share", type=float, default=0.01)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.corpus.is_dir():
        print(f"corpus {args.corpus} not found: apt-get install python3.11-doc", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        files = copy_corpus(args.corpus, work / "sources" / SOURCE, args.docs)
        home = str(work / "home")
        model = EmbeddingModelResource()
        resources = {
            "sources": DocumentSourcesResource(root=str(work / "sources")),
            "warehouse": WarehouseResource(home=home),
            "index_store": IndexStoreResource(home=home),
            "model": model,
            "cache": EmbeddingCacheResource(home=home),
        }
        defs = build_definitions(resources)
        model._model()  # load before timing: the full run is not charged for it
        results = []
        with dg.instance_for_test() as instance:
            seconds, assets, index = timed_run(defs, instance)
            full = describe("full", seconds, assets, index)
            seconds, assets, index = timed_run(defs, instance)
            unchanged = describe("unchanged", seconds, assets, index)
            rng = random.Random(0)
            changed_files = rng.sample(files, max(1, round(len(files) * args.changed_share)))
            for path in changed_files:
                edit_one_paragraph(path, rng)
            seconds, assets, index = timed_run(defs, instance)
            changed = describe(f"{len(changed_files)} files changed", seconds, assets, index)
            results = [full, unchanged, changed]
        report = {
            "documents": len(files),
            "phases": results,
            "unchanged_ratio": round(unchanged["seconds"] / full["seconds"], 4),
            "changed_ratio": round(changed["seconds"] / full["seconds"], 4),
        }
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"incremental re-runs on {len(files)} python3.11-doc pages")
            print(f"{'phase':<22}{'seconds':>9}{'docs +/~/=/-':>18}{'chunks +/-':>12}{'embedded':>10}{'index':>13}")
            for r in results:
                d, c = r["documents"], r["chunks"]
                docs = f"{d['added']}/{d['updated']}/{d['unchanged']}/{d['deleted']}"
                print(f"{r['phase']:<22}{r['seconds']:>9.2f}{docs:>18}{c['added']:>7}/{c['removed']:<4}"
                      f"{r['embedded_by_model']:>10}{r['index']['build_mode']:>13}")
            print(f"unchanged re-run / full run = {report['unchanged_ratio']:.4f} (goal <= 0.01)")
            print(f"1% changed re-run / full run = {report['changed_ratio']:.4f} (goal <= 0.03)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
