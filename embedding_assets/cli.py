"""`embedding-pipeline`: materialize sources and the index, search the published index.

Runs execute in-process against the Dagster instance in ``DAGSTER_HOME`` (default
``{EMBEDDING_HOME}/dagster``), the same one ``make ui`` opens, so CLI runs show in the UI's run history.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# Written into a new DAGSTER_HOME: no telemetry (this machine may have no network). No pool limit:
# the warehouse's file lock already serializes DuckDB writers across processes, and a limit of one
# left a run waiting for a slot a failed run never handed on.
# The instance config `make ui`, the CLI and the tests write into a new DAGSTER_HOME.
# Every step that writes the warehouse is in the pool embedding_warehouse (assets.WAREHOUSE_POOL). The
# warehouse's file lock keeps parallel writers correct; the limit keeps parallel partition runs from
# piling up on that lock (they wait for a slot, visibly, in the UI). Two slots: one run's long embedding
# step still lets another run's short clean/chunk/dedup steps through.
DAGSTER_YAML = """telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 2
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
    mat.add_argument("--full-check", action="store_true",
                     help="run the jobs even when nothing changed since a run proved this state settled")
    find = sub.add_parser("search", help="search the published index")
    find.add_argument("query")
    find.add_argument("--k", type=int, default=5, help="number of hits (default 5)")
    find.add_argument("--json", action="store_true", help="one JSON object per hit")
    find.add_argument("--source", default=None, metavar="NAME", help="only hits from this source")
    find.add_argument("--mode", default=None, choices=["vector", "lexical", "hybrid"],
                      help="hybrid (default: vector and BM25 fused by reciprocal rank; vector on an index without BM25), vector or lexical")
    find.add_argument("--chunks", action="store_true", help="every matching chunk, not the best chunk per document")
    sub.add_parser("sources", help="list the sources found under EMBEDDING_SOURCES_DIR")
    rm = sub.add_parser("remove-source", help="delete a removed source's partition, rows and vectors")
    rm.add_argument("name")
    rm.add_argument("--no-index", action="store_true", help="skip rebuilding the index afterwards")
    serve = sub.add_parser("serve", help="serve /search, /v1/embeddings and a search page over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    work = sub.add_parser("worker", help="run a Celery worker for the pipeline's steps (EMBEDDING_EXECUTOR=celery)")
    work.add_argument("--name", default=None, help="worker name (default: embedding@<host>)")
    work.add_argument("--queue", action="append", default=[], metavar="NAME",
                      help="queue to take steps from; repeatable (default: dagster and gpu)")
    work.add_argument("--concurrency", type=int, default=1, help="steps at a time (default 1: one per GPU)")
    args = parser.parse_args(argv)
    try:
        if args.command == "materialize":
            return _materialize(args)
        if args.command == "search":
            return _search(args)
        if args.command == "remove-source":
            return _remove_source(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "worker":
            from embedding_assets.cluster.worker import run_worker

            return run_worker(name=args.name, queues=args.queue, concurrency=args.concurrency)
        return _sources()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - an expected failure is one line; anything else is a bug: its traceback
        message = explain(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return _exit_code(exc)


class CommandError(Exception):
    """A command refused its input or cannot start; the message names the input and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def _exit_code(exc: BaseException) -> int:
    """2 for bad input or a bad EMBEDDING_* setting (as argparse and ``serve`` answer), else 1."""
    from embedding_assets.settings import SettingError

    if isinstance(exc, CommandError):
        return exc.exit_code
    return EXIT_USAGE if any(isinstance(e, SettingError) for e in _chain(exc)) else EXIT_FAILED


def explain(exc: BaseException) -> str | None:
    """The one-line message for an expected failure (bad input, missing or damaged state, a lock
    timeout, a full disk, bad settings), or None for anything else, which is a bug worth its traceback.

    A full disk is recognized anywhere in the exception chain (the warehouse, the index store, the
    cache, Dagster's own storage): the message names the folder, says there is no space left on device
    and that nothing stored was lost (every write is rolled back or published atomically).
    """
    from embedding_assets.runner import RunFailed

    if isinstance(exc, RunFailed):
        where = f"source {exc.source}: " if exc.source else ""
        inner = explain(exc.cause) if exc.cause is not None and exc.cause is not exc else None
        if inner is None:
            full = _disk_full(exc)
            return f"{where}{full}" if full else None
        return f"{where}{inner}"
    if _connection_lost(exc):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (
            f"a PostgreSQL connection was lost during the run (server restarted or unreachable): {first}; its unit of "
            "work was rolled back and no partial index was published: run again once the server answers"
        )
    from embedding_assets.runner import StepFailedOnWorker

    if isinstance(exc, StepFailedOnWorker):  # a step on a Celery worker: only its class name came back
        expected = {cls.__name__ for cls in _expected_errors()}
        return str(exc).strip().splitlines()[0] if exc.error_class in expected else None
    if isinstance(exc, _expected_errors()):
        message = str(exc)
        if "another index build is still running" in message:
            message += "; retry later, or set EMBEDDING_BUILD_LOCK_TIMEOUT_SECONDS to wait longer"
        return message
    return _disk_full(exc) or _os_error(exc)


def _connection_lost(exc: BaseException) -> bool:
    """A lost PostgreSQL connection (Dagster's instance storage or a worker's step, through SQLAlchemy,
    psycopg or psycopg2): OperationalError raised here, or named by a step that failed on a worker."""
    from embedding_assets.runner import StepFailedOnWorker

    if isinstance(exc, StepFailedOnWorker):
        return exc.error_class == "OperationalError"
    return type(exc).__name__ == "OperationalError" and type(exc).__module__.split(".")[0] in (
        "sqlalchemy", "psycopg", "psycopg2",
    )  # fmt: skip


def _expected_errors() -> tuple[type[BaseException], ...]:
    from dagster import Failure  # raised by an asset with a message for its user (a source folder that is gone)

    from embedding_assets.checks import QualityGateError
    from embedding_assets.core.chunking import ChunkingError
    from embedding_assets.core.sources import SourceError
    from embedding_assets.settings import SettingError
    from embedding_assets.stages.remove_source import SourceRemovalError
    from resources.cache.errors import EmbeddingCacheConfigError, EmbeddingCacheStorageError
    from resources.index_store import IndexStoreError
    from resources.locks import LockTimeout
    from resources.model import ModelConfigError
    from resources.warehouse import WarehouseError

    return (
        CommandError, WarehouseError, IndexStoreError, SettingError, SourceError, SourceRemovalError,
        ModelConfigError, EmbeddingCacheConfigError, EmbeddingCacheStorageError, LockTimeout,
        QualityGateError, ChunkingError, Failure,
    )  # fmt: skip


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or any(item is s for s in seen):
            continue
        seen.append(item)
        todo += [item.__cause__, item.__context__, getattr(item, "cause", None), getattr(item, "user_exception", None)]
    return seen


_FULL_SIGNS = ("No space left on device", "database or disk is full")


def _disk_full(exc: BaseException) -> str | None:
    chain = _chain(exc)
    if not any(
        (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(sign in str(e) for sign in _FULL_SIGNS)
        for e in chain
    ):
        return None
    from resources.warehouse import WarehouseError

    for e in chain:
        if isinstance(e, WarehouseError):  # it names the file and the remedy already
            return str(e)
    named = [Path(e.filename) for e in chain if isinstance(e, OSError) and isinstance(e.filename, str)]
    folder = _full_folder(named)
    return (
        f"no space left on device in {folder}: free space on that disk (or move EMBEDDING_HOME / DAGSTER_HOME "
        "to a larger one) and run again; nothing stored was lost: the failed write was rolled back and the "
        "published index is unchanged"
    )


def _full_folder(named: list[Path]) -> Path:
    """The folder whose disk is full: a path the error named, else the state folder with no space left."""
    from embedding_assets.settings import load_settings

    home = load_settings().home_path
    candidates = [p if p.is_dir() else p.parent for p in named]
    candidates += [home, Path(os.environ.get("DAGSTER_HOME") or home / "dagster")]
    for folder in candidates:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if shutil.disk_usage(existing).free < 1 << 20:
                return folder
        except OSError:
            continue
    return candidates[0]


def _no_space_left(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _os_error(exc: BaseException) -> str | None:
    """A file-system refusal (permissions, read-only, a file where a folder belongs), naming the path."""
    if not isinstance(exc, OSError) or exc.errno not in _OS_REMEDIES:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return f"cannot use{where}: {exc.strerror}: {_OS_REMEDIES[exc.errno]}"


_OS_REMEDIES = {
    errno.EACCES: "give the pipeline's user permission on it (EMBEDDING_HOME, DAGSTER_HOME)",
    errno.EPERM: "give the pipeline's user permission on it (EMBEDDING_HOME, DAGSTER_HOME)",
    errno.EROFS: "remount it read-write or point EMBEDDING_HOME / DAGSTER_HOME at a writable folder",
    errno.EEXIST: "a file is in the way of a folder: move it aside or point EMBEDDING_HOME / DAGSTER_HOME elsewhere",
    errno.ENOTDIR: "a file is in the way of a folder: move it aside or point EMBEDDING_HOME / DAGSTER_HOME elsewhere",
}


def _instance():
    """The Dagster instance of DAGSTER_HOME (default ``{EMBEDDING_HOME}/dagster``), created on first use.

    Only the commands that run jobs open it: ``search`` and ``sources`` also work on a read-only home.
    """
    import dagster as dg

    from embedding_assets.settings import load_settings

    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(load_settings().home_path / "dagster")
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    config = dagster_home / "dagster.yaml"
    try:
        dagster_home.mkdir(parents=True, exist_ok=True)
        if not config.exists():
            config.write_text(DAGSTER_YAML)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # explain() names the full folder; a failed write names no file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(exc.filename or config)) from exc
        raise CommandError(
            f"cannot create the Dagster instance folder {dagster_home} (DAGSTER_HOME): {exc.strerror or exc}: "
            + _OS_REMEDIES.get(exc.errno, "point DAGSTER_HOME at a writable folder"),
            EXIT_FAILED,
        ) from exc
    try:
        return dg.DagsterInstance.get()
    except Exception as exc:  # noqa: BLE001 - a damaged dagster.yaml or instance storage; Dagster's own types vary
        if _disk_full(exc):
            raise
        if _no_space_left(dagster_home):  # SQLite reports a full disk as "disk I/O error" when it cannot grow
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dagster_home)) from exc
        raise CommandError(
            f"cannot open the Dagster instance in {dagster_home} (DAGSTER_HOME): {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}: fix or move aside {config} "
            "(a new one is written on the next run) or point DAGSTER_HOME at another folder; the warehouse and "
            "the published index do not depend on it",
            EXIT_FAILED,
        ) from exc


def _sources() -> int:
    from embedding_assets.settings import load_settings
    from embedding_assets.core.sources import list_sources

    root = load_settings().sources_path
    if not root.is_dir():
        raise CommandError(_no_sources_root(root))
    for name in list_sources(root):
        print(name)
    return 0


def _materialize(args) -> int:
    from embedding_assets import unchanged
    from embedding_assets.core.sources import list_sources
    from embedding_assets.settings import load_settings

    started = time.perf_counter()
    settings = load_settings()
    root = settings.sources_path
    if not args.source and not root.is_dir():
        raise CommandError(_no_sources_root(root))
    names = args.source or list_sources(root)
    if not names:
        raise CommandError(f"no sources under {root} (EMBEDDING_SOURCES_DIR); create a folder per source")
    command = unchanged.Command(tuple(names), args.allow_empty, args.no_index)
    shortcut: dict[str, Any] = {"taken": False}
    if args.full_check:
        shortcut["why"] = "--full-check"
    else:  # before Dagster is imported: an unchanged re-run ends here (embedding_assets/unchanged.py)
        try:
            report = unchanged.remembered(settings, command)
        except unchanged.NotApplicable as why:
            report, shortcut["why"] = None, str(why)
        if report is not None:
            report["seconds"] = round(time.perf_counter() - started, 3)
            report["shortcut"] = {"taken": True, "since": report.pop("unchanged_since", None)}
            _report(report, args.json)
            return 0

    from embedding_assets.definitions import defs
    from embedding_assets.progress import TerminalProgress, set_terminal_reporter
    from embedding_assets.runner import materialize_index, materialize_source, source_summary

    instance = _instance()
    for name in names:
        _check_source_name(root, name, instance)
    model_path, before = _inputs_before(defs, settings, command, shortcut)
    out = sys.stderr if args.json else sys.stdout
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
    finally:
        set_terminal_reporter(None)
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["quarantine"] = _quarantine(names)
    if before is not None:  # a run that wrote nothing, with nothing moved while it ran: remembered
        moved = unchanged.remember(settings, command, before, report, model_path)
        shortcut.update(remembered=not moved, **({"why": "the run changed (or another process did): " + ", ".join(moved)} if moved else {}))
    report["shortcut"] = shortcut
    _report(report, args.json)
    return 0


def _inputs_before(defs, settings, command, shortcut: dict[str, Any]):
    """(model folder, the run's inputs before it) for :func:`unchanged.remember`; (None, None) when the
    shortcut cannot apply (the reason goes into ``shortcut``). A model setting that cannot be used is the
    run's to report, with its own error."""
    from embedding_assets import unchanged

    try:
        model_path = str(defs.resources["model"].model_path())
        return model_path, unchanged.inputs(settings, command, model_path)
    except unchanged.NotApplicable as why:
        shortcut["why"] = str(why)
    except Exception:  # noqa: BLE001 - e.g. ModelConfigError: the run fails on it and says why
        shortcut["why"] = "the model could not be resolved"
    return None, None


def _report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_summary(report)


def _check_source_name(root: Path, name: str, instance) -> None:
    """Refuse a name that is no source folder and no known partition (a typo) before any run starts,
    so it leaves nothing behind. A known source whose folder is gone goes on to its run, which fails
    unless --allow-empty (the explicit way to empty it)."""
    from embedding_assets.core.sources import list_sources, source_dir
    from embedding_assets.partitions import SOURCES_PARTITIONS_NAME

    folder = source_dir(root, name)  # SourceError for names that can never be a source
    if folder.exists() or instance.has_dynamic_partition(SOURCES_PARTITIONS_NAME, name):
        return
    known = list_sources(root) if root.is_dir() else []
    close = difflib.get_close_matches(name, known, n=1)
    raise CommandError(
        f"no source folder {folder}: {name!r} is not a source"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + (f"; sources under {root}: {', '.join(known)}" if known else f"; {root} has no source folders")
    )


def _no_sources_root(root: Path) -> str:
    what = "is not a folder" if root.exists() else "does not exist"
    return f"the sources root {root} {what}: set EMBEDDING_SOURCES_DIR to the folder holding one folder per source"


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
    shortcut = report.get("shortcut") or {}
    if shortcut.get("taken"):
        print(f"nothing changed since {shortcut.get('since')}, when a full run found nothing to do: no run started "
              "(--full-check runs one); that run's report:")
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
    if shortcut.get("taken"):
        print(f"checked in {report['seconds'] * 1000:.0f} ms")
    else:
        print(f"done in {report['seconds']:.1f} s")


def _remove_source(args) -> int:
    from embedding_assets.definitions import defs
    from embedding_assets.partitions import SOURCES_PARTITIONS_NAME
    from embedding_assets.runner import RunFailed, materialize_index, remove_source_run
    from embedding_assets.settings import load_settings
    from embedding_assets.stages.remove_source import (
        RemovalReport, SourceRemovalError, refuse_while_folder_exists, remove_source,
    )  # fmt: skip

    instance = _instance()
    try:
        # Refused here, before a run: a mistaken command leaves no failed run in the history.
        refuse_while_folder_exists(load_settings().sources_path, args.name)
        if instance.has_dynamic_partition(SOURCES_PARTITIONS_NAME, args.name):
            # The job the UI launches, so both ways remove a source the same way and leave a run in the history.
            summary = remove_source_run(defs, instance, args.name)
            report = RemovalReport(**summary)
        else:  # rows left without a partition (an older removal): the same code, without a run
            report = remove_source(defs.resources["warehouse"], instance, args.name, sources_root=load_settings().sources_path)
    except (SourceRemovalError, RunFailed, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    deleted = sum(report.rows_deleted.values())
    print(f"removed source {args.name}: {deleted} rows, partition deleted: {report.partition_deleted}")
    if report.sources_to_rerun:
        print(f"  {report.orphaned_duplicates} duplicates of its chunks in {', '.join(report.sources_to_rerun)} "
              "become canonical at the next materialize of any source")
    if not args.no_index:
        try:
            index = materialize_index(defs, instance)
        except RunFailed as exc:
            message = explain(exc)
            if message is None:
                raise
            raise CommandError(
                f"source {args.name} was removed, but the index was not rebuilt: {message}; the published index "
                "still holds its vectors until `embedding-pipeline materialize` builds a new one",
                EXIT_FAILED,
            ) from exc
        print(f"index {index['version']}: {index['row_count']} vectors")
    return 0


def _search(args) -> int:
    from embedding_assets.search import SearchError, search
    from embedding_assets.settings import index_store_resource, model_resource

    if args.k < 1:
        raise CommandError("--k must be >= 1")
    try:
        hits = search(args.query, args.k, model=model_resource(), index_store=index_store_resource(), source=args.source,
                      mode=args.mode, per_document=not args.chunks)
    except SearchError as exc:
        raise CommandError(str(exc)) from None
    for rank, hit in enumerate(hits, 1):
        if args.json:
            print(hit.to_json())
        else:
            snippet = " ".join(hit.text.split())[:200]
            page = f" (page {hit.page})" if hit.page else ""
            print(f"{rank}. {hit.score:.3f}  {hit.source}/{hit.doc_path}{page}  {' > '.join(hit.heading_path)}\n   {snippet}")
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
