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
from typing import Self

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


def deal_sources(shared: Path) -> Path:
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


def _materialize_command() -> list[str]:
    return [sys.executable, "-m", "embedding_assets.cli", "materialize", "--json"]


def _materialize(env: dict[str, str], cwd: Path) -> dict:
    done = subprocess.run(_materialize_command(), env=env, cwd=cwd, capture_output=True, text=True, timeout=1800, check=False)  # noqa: S603 - our own interpreter and module, fixed arguments
    if done.returncode != 0:
        raise RuntimeError(f"materialize failed in {cwd}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def _dagster_events(postgres_url: str, event_type: str) -> list[dict]:
    """The ``dagster_event`` of every event-log row of ``event_type``, oldest first."""
    import psycopg

    with psycopg.connect(postgres_url.replace("+psycopg2", ""), connect_timeout=5) as conn:
        if conn.execute("SELECT to_regclass('event_logs')").fetchone()[0] is None:
            return []  # no run has created the instance's tables yet
        rows = conn.execute("SELECT event FROM event_logs WHERE dagster_event_type = %s ORDER BY id", [event_type]).fetchall()
    return [json.loads(event).get("dagster_event") or {} for (event,) in rows]


def _steps_taken(postgres_url: str) -> list[tuple[str, str]]:
    """(worker, step key) of every step a Celery worker took, oldest first: dagster-celery logs an engine
    event naming the worker when a task starts."""
    taken = []
    for dagster_event in _dagster_events(postgres_url, "ENGINE_EVENT"):
        if "in celery worker" not in dagster_event.get("message", ""):
            continue
        entries = (dagster_event.get("event_specific_data") or {}).get("metadata_entries") or []
        worker = next((e["entry_data"]["text"] for e in entries if e.get("label") == "Celery worker"), "unknown")
        taken.append((worker.split("@")[0], dagster_event.get("step_key")))
    return taken


def _steps_by_worker(postgres_url: str) -> dict[str, list[str]]:
    """{worker: [step keys]} from the Dagster event log."""
    out: dict[str, list[str]] = {}
    for worker, step in _steps_taken(postgres_url):
        out.setdefault(worker, []).append(step)
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


class LocalCluster:
    """PostgreSQL, Redis and Celery workers on this machine's loopback, each node in its own folder under ``work``.

    ``start()`` starts the servers and the named workers; ``node(name)`` is a node's environment and folder;
    ``materialize()`` runs the CLI on the ``launcher`` node and waits, ``launch()`` starts it and returns the
    process; ``stop()`` stops everything started (also after a failure). The workers share only
    ``work/shared`` (sources and index): each has its own home (disk cache, scratch) and DAGSTER_HOME.
    Used by the demo and the fault tests (tests/test_cluster_faults.py), which kill workers and restart
    PostgreSQL under a run.
    """

    def __init__(self, work: Path, *, env: dict[str, str] | None = None):
        from embedding_assets.cluster.postgres_server import PostgresServer

        self.work = Path(work)
        self.pg = PostgresServer(self.work / "postgres")
        self.shared = self.work / "shared"
        self.index_dir = self.shared / "index"
        self.workers: dict[str, subprocess.Popen] = {}
        self._extra_env = dict(env or {})
        self._redis: subprocess.Popen | None = None
        self._env: dict[str, str] = {}

    def start(self, workers: tuple[str, ...] = ("worker-1", "worker-2")) -> LocalCluster:
        from embedding_assets.cluster.postgres_server import free_tcp_port

        self.pg.start()
        dagster_db, self.warehouse_url = self.pg.create_database("dagster"), self.pg.create_database("warehouse")
        # SQLAlchemy 2.1 picks psycopg 3 for postgresql://, whose server-side binding breaks dagster-postgres's
        # NOTIFY; dagster-postgres is written for psycopg2.
        self.dagster_url = dagster_db.replace("postgresql://", "postgresql+psycopg2://", 1)
        redis_port = free_tcp_port()
        (self.work / "redis").mkdir()
        self._redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",  # noqa: S603, S607 - the redis-server on PATH with fixed arguments
                                        "--appendonly", "no", "--dir", str(self.work / "redis")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.sources = deal_sources(self.shared)
        self._env = {
            **_base_env(), "EMBEDDING_WAREHOUSE_URL": self.warehouse_url, "EMBEDDING_INDEX_DIR": str(self.index_dir),
            "EMBEDDING_SOURCES_DIR": str(self.sources), "EMBEDDING_EXECUTOR": "celery", "EMBEDDING_CELERY_BROKER": redis_url,
            "EMBEDDING_REDIS_URL": redis_url, "DAGSTER_POSTGRES_URL": self.dagster_url, **self._extra_env,
        }  # fmt: skip
        for name in workers:
            self.start_worker(name)
        time.sleep(8)  # workers connect to the broker
        return self

    def node(self, name: str) -> tuple[dict[str, str], Path]:
        folder = self.work / name
        if not (folder / "dagster" / "dagster.yaml").exists():
            (folder / "dagster").mkdir(parents=True)
            (folder / "dagster" / "dagster.yaml").write_text(DAGSTER_YAML)
        return {**self._env, "EMBEDDING_HOME": str(folder / "home"), "DAGSTER_HOME": str(folder / "dagster")}, folder

    def start_worker(self, name: str) -> subprocess.Popen:
        """A worker in a session of its own, so ``kill_worker`` can take the whole worker (pool processes too)."""
        env, folder = self.node(name)
        log = open(folder / "worker.log", "a")  # noqa: SIM115 - closed with the process
        self.workers[name] = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
            [sys.executable, "-m", "embedding_assets.cli", "worker", "--name", name, "--concurrency", "1"],
            env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        return self.workers[name]

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker's whole process group: the machine is gone, no warm shutdown, no acknowledgement."""
        process = self.workers[name]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def materialize(self, node: str = "launcher") -> dict:
        env, folder = self.node(node)
        return _materialize(env, folder)

    def launch(self, node: str = "launcher") -> subprocess.Popen:
        """``materialize --json`` on ``node`` in the background (stdout and stderr piped)."""
        env, folder = self.node(node)
        return subprocess.Popen(_materialize_command(), env=env, cwd=folder, stdout=subprocess.PIPE,  # noqa: S603 - our own interpreter and module, fixed arguments
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def started_steps(self) -> list[str]:
        """The step key of every STEP_START in the event log, oldest first (a step of each run)."""
        return [e.get("step_key") for e in _dagster_events(self.dagster_url, "STEP_START")]

    def steps_by_worker(self) -> dict[str, list[str]]:
        return _steps_by_worker(self.dagster_url)

    def worker_of(self, step: str) -> str | None:
        """The worker that last took ``step`` (dagster-celery logs the worker before the step starts)."""
        return next((worker for worker, key in reversed(_steps_taken(self.dagster_url)) if key == step), None)

    def live_ids(self, node: str = "launcher") -> list[tuple[str, int]]:
        return _live_ids(self.warehouse_url, self.work / node / "home")

    def top5(self, node: str = "launcher") -> list[list[str]]:
        return _top5(self.work / node / "home", self.index_dir)

    def stop(self) -> None:
        for process in [*self.workers.values(), self._redis]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers.values(), self._redis]:
            if process is None:
                continue
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.pg.stop("immediate")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def embedded_run(work: Path, sources: Path) -> tuple[list[tuple[str, int]], list[list[str]]]:
    """The same sources in embedded mode (DuckDB, in-process executor): its live (chunk id, vector id) pairs
    and the top-5 hits of the demo's queries, the reference a cluster run must equal."""
    home = work / "embedded"
    home.mkdir()
    env = {**_base_env(), "EMBEDDING_HOME": str(home / "home"), "EMBEDDING_SOURCES_DIR": str(sources),
           "DAGSTER_HOME": str(home / "dagster")}  # fmt: skip
    _materialize(env, home)
    return _live_ids(None, home / "home"), _top5(home / "home", None)


def compare(cluster_ids, cluster_hits, embedded_ids, embedded_hits) -> list[str]:
    """The differences between a cluster run and the embedded run; empty when they are equal."""
    differences = []
    if cluster_ids != embedded_ids:
        differences.append(f"live chunk/vector ids differ: {len(cluster_ids)} vs {len(embedded_ids)}")
    differences += [f"top-5 of {q!r} differ" for q, a, b in zip(QUERIES, cluster_hits, embedded_hits) if a != b]
    return differences


def run(work: Path) -> dict:
    with LocalCluster(work) as cluster:
        cluster.start()
        cluster_report = cluster.materialize()
        embedded_ids, embedded_hits = embedded_run(work, cluster.sources)
        differences = compare(cluster.live_ids(), cluster.top5(), embedded_ids, embedded_hits)
        return {
            "workers": cluster.steps_by_worker(),
            "vectors": cluster_report["index"]["row_count"],
            "equal_to_embedded": not differences,
            "differences": differences,
        }


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
