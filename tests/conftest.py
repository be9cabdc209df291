"""Shared pytest fixtures. Each block is self-contained; append new fixtures in their own block."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# --------------------------------------------------------------------------- real redis-server

REDIS_SERVER_BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServerProcess:
    """A real ``redis-server`` on 127.0.0.1 without persistence, stoppable for fault tests."""

    def __init__(self, data_dir: Path, password: str | None = None):
        self.port = free_tcp_port()
        self.password = password
        self._data_dir = data_dir
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self._process is not None and self._process.poll() is None:
            return
        args = [
            REDIS_SERVER_BINARY,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._data_dir),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_for_ping()

    def stop(self) -> None:
        """Kill the server (SIGKILL, like a crash) and wait until its port is closed."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def _wait_for_ping(self, timeout_s: float = 10.0) -> None:
        ping = b"*1\r\n$4\r\nPING\r\n"
        if self.password:
            auth = self.password.encode()
            ping = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(auth), auth) + ping
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self._process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(ping)
                    reply = b""
                    while b"+PONG" not in reply:
                        chunk = sock.recv(256)
                        if not chunk:
                            break
                        reply += chunk
                    if b"+PONG" in reply:
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s} s")


def _redis_server_or_skip(
    tmp_path_factory: pytest.TempPathFactory, password: str | None
) -> Iterator[RedisServerProcess]:
    if not Path(REDIS_SERVER_BINARY).exists():
        pytest.skip("redis-server is not installed; run `make test`, which installs it")
    server = RedisServerProcess(tmp_path_factory.mktemp("redis"), password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    """A fresh real redis-server (no auth) for one test: ``.url``, ``.port``, ``.stop()``, ``.start()``."""
    yield from _redis_server_or_skip(tmp_path_factory, password=None)


@pytest.fixture
def redis_server_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    """Like ``redis_server`` but with ``--requirepass``: ``.password`` holds it, ``.url`` includes it."""
    yield from _redis_server_or_skip(tmp_path_factory, password="pw-" + secrets.token_hex(8))


# --------------------------------------------------------------------------- Dagster instance


@pytest.fixture(scope="module")
def instance():
    """A temporary Dagster instance shared by one test module (runs, events, dynamic partitions)."""
    import dagster as dg

    with dg.instance_for_test() as inst:
        yield inst


# --------------------------------------------------------------------------- real PostgreSQL (warehouse backends)

# Integration tests that take the `warehouse_backend` fixture run once per backend.
WAREHOUSE_BACKENDS = ("duckdb", "postgresql")


class LazyPostgres:
    """One real PostgreSQL server on a free loopback port in a temporary folder, started on first use."""

    def __init__(self):
        self._server = None
        self._folder: Path | None = None

    def get(self):
        import tempfile

        from embedding_assets.cluster.postgres_server import PostgresServer, PostgresUnavailable

        if self._server is None:
            # Not under pytest's tmp dirs: those are private to root, and the server runs as `postgres`.
            folder = Path(tempfile.mkdtemp(prefix="embedding-pg-"))
            folder.chmod(0o755)
            try:
                server = PostgresServer(folder / "cluster")
            except PostgresUnavailable as exc:
                shutil.rmtree(folder, ignore_errors=True)
                pytest.skip(str(exc))
            self._folder = folder
            server.start()
            self._server = server
        return self._server

    def close(self) -> None:
        if self._server is not None:
            self._server.stop("immediate")
            self._server = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _lazy_postgres():
    holder = LazyPostgres()
    yield holder
    holder.close()


@pytest.fixture(scope="session")
def postgres_server(_lazy_postgres):
    """The session's real PostgreSQL server (``.url(db)``, ``.create_database(name)``, ``.restart()``, ``.port``);
    skips with the reason when the server binaries are not installed."""
    return _lazy_postgres.get()


@pytest.fixture(scope="module", params=WAREHOUSE_BACKENDS)
def warehouse_backend(request) -> str:
    """``"duckdb"`` or ``"postgresql"``: a module's tests run once per warehouse backend."""
    return request.param


class WarehouseDatabases:
    """Fresh warehouses per backend: ``new(backend)`` is a new PostgreSQL database's URL, or None (DuckDB under
    the pipeline's home); ``clone(url)`` copies one (for DuckDB copying the home is the copy)."""

    def __init__(self, postgres: LazyPostgres):
        self._postgres = postgres
        self._count = 0

    def new(self, backend: str) -> str | None:
        if backend == "duckdb":
            return None
        self._count += 1
        return self._postgres.get().create_database(f"warehouse_{self._count}")

    def clone(self, url: str | None) -> str | None:
        if url is None:
            return None
        self._count += 1
        return self._postgres.get().clone_database(url.rsplit("/", 1)[1], f"warehouse_{self._count}")


@pytest.fixture(scope="session")
def warehouse_databases(_lazy_postgres) -> WarehouseDatabases:
    return WarehouseDatabases(_lazy_postgres)
