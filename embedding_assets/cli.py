"""`embedding-pipeline`: materialize sources and the index, search the published index.

Runs execute in-process against the Dagster instance in ``DAGSTER_HOME`` (default
``{EMBEDDING_HOME}/dagster``), the same one ``make ui`` opens, so CLI runs show in the UI's run history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Written into a new DAGSTER_HOME: no telemetry (this machine may have no network). No pool limit:
# the warehouse's file lock already serializes DuckDB writers across processes, and a limit of one
# left a run waiting for a slot a failed run never handed on.
DAGSTER_YAML = """telemetry:
  enabled: false
"""

EXIT_USAGE = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="embedding-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mat = sub.add_parser("materialize", help="materialize sources (all when none given), then the index")
    mat.add_argument("--source", action="append", default=[], metavar="NAME", help="a source folder name; repeatable")
    mat.add_argument("--allow-empty", action="store_true", help="let an empty or missing source delete its documents")
    mat.add_argument("--no-index", action="store_true", help="skip building the index")
    mat.add_argument("--json", action="store_true", help="print the run report as JSON on stdout")
    find = sub.add_parser("search", help="search the published index")
    find.add_argument("query")
    find.add_argument("--k", type=int, default=5, help="number of hits (default 5)")
    find.add_argument("--json", action="store_true", help="one JSON object per hit")
    find.add_argument("--source", default=None, metavar="NAME", help="only hits from this source")
    sub.add_parser("sources", help="list the sources found under EMBEDDING_SOURCES_DIR")
    rm = sub.add_parser("remove-source", help="delete a removed source's partition, rows and vectors")
    rm.add_argument("name")
    rm.add_argument("--no-index", action="store_true", help="skip rebuilding the index afterwards")
    serve = sub.add_parser("serve", help="serve /search, /v1/embeddings and a search page over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    args = parser.parse_args(argv)
    _ensure_dagster_home()
    try:
        if args.command == "materialize":
            return _materialize(args)
        if args.command == "search":
            return _search(args)
        if args.command == "remove-source":
            return _remove_source(args)
        if args.command == "serve":
            return _serve(args)
        return _sources()
    except KeyboardInterrupt:
        return 130


def _ensure_dagster_home() -> None:
    from embedding_assets.settings import home_dir

    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(home_dir() / "dagster")
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)


def _sources() -> int:
    from embedding_assets.settings import sources_dir
    from embedding_assets.core.sources import list_sources

    for name in list_sources(sources_dir()):
        print(name)
    return 0


def _materialize(args) -> int:
    import dagster as dg

    from embedding_assets.definitions import defs
    from embedding_assets.runner import RunFailed, materialize_index, materialize_source, source_summary
    from embedding_assets.progress import TerminalProgress, set_terminal_reporter
    from embedding_assets.settings import sources_dir
    from embedding_assets.core.sources import list_sources, source_dir

    root = sources_dir()
    names = args.source or list_sources(root)
    if not names:
        print(f"error: no sources under {root} (EMBEDDING_SOURCES_DIR); create a folder per source", file=sys.stderr)
        return EXIT_USAGE
    for name in names:
        try:
            source_dir(root, name)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    out = sys.stderr if args.json else sys.stdout
    instance = dg.DagsterInstance.get()
    set_terminal_reporter(TerminalProgress())
    report: dict[str, Any] = {"sources": {}, "index": None}
    started = time.perf_counter()
    try:
        for name in names:
            print(f"source {name}", file=out)
            assets = materialize_source(defs, instance, name, allow_empty=args.allow_empty)
            report["sources"][name] = {"summary": source_summary(assets), "assets": assets}
        if not args.no_index:
            print("index", file=out)
            report["index"] = materialize_index(defs, instance, skip_if_current=True)
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        set_terminal_reporter(None)
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["quarantine"] = _quarantine(names)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_summary(report)
    return 0


def _quarantine(names: list[str]) -> list[dict[str, str]]:
    from embedding_assets.settings import build_resources

    warehouse = build_resources()["warehouse"]
    rows = warehouse.query_rows(
        """SELECT source, relative_path, reason, 'quarantined' FROM quarantine WHERE source IN (SELECT unnest(?::VARCHAR[]))
           UNION ALL
           SELECT source, relative_path, reason, 'skipped' FROM skipped_files WHERE source IN (SELECT unnest(?::VARCHAR[]))
           ORDER BY 1, 2""",
        [names, names],
    )
    return [{"source": s, "path": p, "reason": r, "kind": k} for s, p, r, k in rows]


def _print_summary(report: dict[str, Any]) -> None:
    print()
    print(f"{'source':<16}{'docs +/~/=/-':>16}{'chunks':>9}{'dups':>7}{'embedded':>10}{'cache hits':>12}")
    for name, entry in report["sources"].items():
        assets = entry["assets"]
        raw = assets.get("raw_documents", {})
        dedup = assets.get("deduped_chunks", {})
        emb = assets.get("embeddings", {})
        docs = f"{raw.get('added', 0)}/{raw.get('updated', 0)}/{raw.get('unchanged', 0)}/{raw.get('deleted', 0)}"
        hits = sum(emb.get(f"cache_hits_{t}", 0) for t in ("lru", "redis", "disk"))
        dups = (dedup.get("live_chunks") or 0) - (dedup.get("row_count") or 0)
        print(f"{name:<16}{docs:>16}{assets.get('chunks', {}).get('row_count', 0):>9}{dups:>7}"
              f"{emb.get('embedded_by_model', 0):>10}{hits:>12}")
    index = report.get("index")
    if index:
        print(f"\nindex {index['version']} ({index['build_mode']}): {index['row_count']} vectors, {index['layout']} layout, "
              f"nprobe {index['nprobe']}, rescore x{index.get('rescore_multiplier', 1)}, recall@10 {index['recall_at_10']}"
              + (f"; {index['pending_chunks']} chunks still waiting for embeddings go into the next build"
                 if index.get("pending_chunks") else ""))
    for item in report.get("quarantine", []):
        print(f"  {item['kind']}: {item['source']}/{item['path']}: {item['reason']}")
    print(f"done in {report['seconds']:.1f} s")


def _remove_source(args) -> int:
    import dagster as dg

    from embedding_assets.definitions import defs
    from embedding_assets.runner import RunFailed, materialize_index
    from embedding_assets.settings import sources_dir
    from embedding_assets.stages.remove_source import SourceRemovalError, remove_source

    instance = dg.DagsterInstance.get()
    try:
        report = remove_source(defs.resources["warehouse"], instance, args.name, sources_root=sources_dir())
    except (SourceRemovalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    deleted = sum(report.rows_deleted.values())
    print(f"removed source {args.name}: {deleted} rows, partition deleted: {report.partition_deleted}")
    if report.sources_to_rerun:
        print(f"  {report.orphaned_duplicates} duplicates of its chunks in {', '.join(report.sources_to_rerun)} "
              "become canonical at the next materialize of any source")
    if not args.no_index:
        try:
            index = materialize_index(defs, instance)
        except RunFailed as exc:
            print(f"error: index not rebuilt: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"index {index['version']}: {index['row_count']} vectors")
    return 0


def _search(args) -> int:
    from embedding_assets.search import search
    from embedding_assets.settings import index_store_resource, model_resource
    from resources.index_store import IndexStoreError

    if args.k < 1:
        print("error: --k must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        hits = search(args.query, args.k, model=model_resource(), index_store=index_store_resource(), source=args.source)
    except IndexStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for rank, hit in enumerate(hits, 1):
        if args.json:
            print(hit.to_json())
        else:
            snippet = " ".join(hit.text.split())[:200]
            print(f"{rank}. {hit.score:.3f}  {hit.source}/{hit.doc_path}  {' > '.join(hit.heading_path)}\n   {snippet}")
    return 0


def _serve(args) -> int:
    import logging

    import uvicorn

    from embedding_assets.service import create_app_from_env
    from embedding_assets.settings import SettingError

    try:
        app = create_app_from_env()
    except (SettingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One process: one model and one batcher (dynamic batching needs the requests in one place).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
