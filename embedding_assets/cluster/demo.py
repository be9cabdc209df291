"""``make cluster-demo``: the pipeline on a small cluster on this machine's loopback, compared with one machine.

Starts a real PostgreSQL (warehouse and Dagster instance), a real Redis (Celery broker, shared cache tier)
and two Celery workers, each in its own working folder with its own home; the only shared folder holds the
sources and the index. Backfills 6 source partitions and the index through the Celery executor, runs the
same sources in embedded mode (DuckDB, in-process), and prints one JSON object::

    {"workers": {name: [steps]}, "vectors": n, "equal_to_embedded": bool, "differences": [...]}

Equal means the same live chunk ids and vector ids in both warehouses and the same top-5 hits for 10 queries.
Everything started is stopped at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fixtures" / "corpus"
SOURCES = 6
QUERIES = [
    "how do I keep a sourdough starter alive", "king and pawn endgame opposition", "bees in the cold months",
    "roman aqueduct gradient", "tide pool creatures", "bicycle chain wear", "lighthouse keeper duties",
    "volcanic soil wine", "rock pools at low tide", "feeding a starter flour and water",
]  # fmt: skip
LIVE_IDS = ("SELECT k.chunk_id, k.vector_id FROM chunks k JOIN chunk_dedup x USING (chunk_id) "
            "WHERE x.status = 'canonical' ORDER BY k.chunk_id")
DAGSTER_YAML = "storage:\n  postgres:\n    postgres_url:\n      env: DAGSTER_POSTGRES_URL\ntelemetry:\n  enabled: false\n"


def _sources(shared: Path) -> Path:
    """The fixture corpus's 10 documents dealt into 6 source folders."""
    files = sorted(p for p in CORPUS.glob("*/*") if p.is_file())
    root = shared / "sources"
    for i, path in enumerate(files):
        folder = root / f"source-{i % SOURCES + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    return root


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _materialize(env: dict[str, str], cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "embedding_assets.cli", "materialize", "--json"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"materialize failed in {cwd}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _steps_by_worker(postgres_url: str) -> dict[str, list[str]]:
    """{worker: [step keys]} from the Dagster event log: dagster-celery records which worker ran each step."""
    import psycopg

    out: dict[str, list[str]] = {}
    with psycopg.connect(postgres_url.replace("+psycopg2", "")) as conn:
        rows = conn.execute("SELECT event FROM event_logs WHERE dagster_event_type = 'ENGINE_EVENT' ORDER BY id").fetchall()
    for (event,) in rows:
        dagster_event = json.loads(event).get("dagster_event") or {}
        if "in celery worker" not in dagster_event.get("message", ""):
            continue
        entries = (dagster_event.get("event_specific_data") or {}).get("metadata_entries") or []
        worker = next((e["entry_data"]["text"] for e in entries if e.get("label") == "Celery worker"), "unknown")
        out.setdefault(worker.split("@")[0], []).append(dagster_event.get("step_key"))
    return out


def _live_ids(url: str | None, home: Path) -> list[tuple[str, int]]:
    from resources.warehouse import WarehouseResource

    return [tuple(r) for r in WarehouseResource(home=str(home), url=url).query_rows(LIVE_IDS)]


def _top5(home: Path, index_dir: Path | None) -> list[list[str]]:
    from embedding_assets.search import search
    from resources.index_store import IndexStoreResource
    from resources.model import EmbeddingModelResource

    store = IndexStoreResource(home=str(home), index_dir=str(index_dir) if index_dir else None)
    model = EmbeddingModelResource()
    return [[hit.chunk_id for hit in search(q, 5, model=model, index_store=store)] for q in QUERIES]


def run(work: Path) -> dict:
    from embedding_assets.cluster.postgres_server import PostgresServer, free_tcp_port

    started: list[subprocess.Popen] = []
    pg = PostgresServer(work / "postgres")
    try:
        pg.start()
        dagster_db, warehouse_url = pg.create_database("dagster"), pg.create_database("warehouse")
        # SQLAlchemy 2.1 picks psycopg 3 for postgresql://, whose server-side binding breaks dagster-postgres's
        # NOTIFY; dagster-postgres is written for psycopg2.
        dagster_url = dagster_db.replace("postgresql://", "postgresql+psycopg2://", 1)
        redis_port = free_tcp_port()
        (work / "redis").mkdir()
        started.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",  # noqa: S603, S607 - the redis-server on PATH with fixed arguments
                                         "--appendonly", "no", "--dir", str(work / "redis")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        shared = work / "shared"
        sources = _sources(shared)
        cluster_env = {
            **_base_env(), "EMBEDDING_WAREHOUSE_URL": warehouse_url, "EMBEDDING_INDEX_DIR": str(shared / "index"),
            "EMBEDDING_SOURCES_DIR": str(sources), "EMBEDDING_EXECUTOR": "celery", "EMBEDDING_CELERY_BROKER": redis_url,
            "EMBEDDING_REDIS_URL": redis_url, "DAGSTER_POSTGRES_URL": dagster_url,
        }  # fmt: skip

        def node(name: str) -> tuple[dict[str, str], Path]:
            folder = work / name
            (folder / "dagster").mkdir(parents=True)
            (folder / "dagster" / "dagster.yaml").write_text(DAGSTER_YAML)
            return {**cluster_env, "EMBEDDING_HOME": str(folder / "home"), "DAGSTER_HOME": str(folder / "dagster")}, folder

        for name in ("worker-1", "worker-2"):
            env, folder = node(name)
            log = open(folder / "worker.log", "w")  # noqa: SIM115 - closed with the process
            started.append(subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
                [sys.executable, "-m", "embedding_assets.cli", "worker", "--name", name, "--concurrency", "1"],
                env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        time.sleep(8)  # workers connect to the broker
        env, folder = node("launcher")
        cluster_report = _materialize(env, folder)

        embedded_home = work / "embedded"
        embedded_env = {**_base_env(), "EMBEDDING_HOME": str(embedded_home / "home"), "EMBEDDING_SOURCES_DIR": str(sources),
                        "DAGSTER_HOME": str(embedded_home / "dagster")}  # fmt: skip
        embedded_home.mkdir()
        _materialize(embedded_env, embedded_home)

        differences = []
        cluster_ids, embedded_ids = _live_ids(warehouse_url, work / "launcher" / "home"), _live_ids(None, embedded_home / "home")
        if cluster_ids != embedded_ids:
            differences.append(f"live chunk/vector ids differ: {len(cluster_ids)} vs {len(embedded_ids)}")
        cluster_hits, embedded_hits = _top5(work / "launcher" / "home", shared / "index"), _top5(embedded_home / "home", None)
        differences += [f"top-5 of {q!r} differ" for q, a, b in zip(QUERIES, cluster_hits, embedded_hits) if a != b]
        return {
            "workers": _steps_by_worker(dagster_url),
            "vectors": cluster_report["index"]["row_count"],
            "equal_to_embedded": not differences,
            "differences": differences,
        }
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        pg.stop("immediate")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="embedding-cluster-"))
    work.chmod(0o755)  # the PostgreSQL server runs as `postgres` under it
    try:
        print(json.dumps(run(work), indent=2))
        return 0
    finally:
        from embedding_assets.settings import load_settings

        if not load_settings().demo_keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
