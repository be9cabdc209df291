"""A throwaway PostgreSQL server on loopback: initdb in a folder, pg_ctl start/stop (tests and the cluster demo).

Debian installs the server binaries under ``/usr/lib/postgresql/<major>/bin``. initdb and the server refuse
to run as root, so as root they run as the ``postgres`` user (``runuser``) on a folder it owns. The cluster
is created with the C collation so text sorts byte-wise, as DuckDB sorts it (the warehouse requires it).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psycopg


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed here."""


def server_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb and pg_ctl (or ``$PG_BIN_DIR``)."""
    candidates = [os.environ["PG_BIN_DIR"]] if os.environ.get("PG_BIN_DIR") else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin: "
        "install Debian's postgresql package (apt-get install postgresql) or set PG_BIN_DIR"
    )


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """``start()`` (initdb on first start), ``stop()``, ``restart()``; ``url(db)`` and ``create_database(name)``."""

    def __init__(self, folder: Path, port: int | None = None):
        self.bin = server_bin_dir()
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.port = port or free_tcp_port()
        self._as_postgres = os.geteuid() == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            if self._as_postgres:
                shutil.chown(self.folder, "postgres", "postgres")
            self._run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                      "--locale=C", "--encoding=UTF8", "--no-sync")  # fmt: skip
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off -c max_connections=200"
        result = self._run(self.bin / "pg_ctl", "-D", self.data, "-o", options, "-l", self.folder / "server.log",
                           "-w", "-t", "60", "start", check=False)  # fmt: skip
        if result.returncode != 0:
            log = (self.folder / "server.log").read_text(errors="replace")[-2000:] if (self.folder / "server.log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start on port {self.port}: {result.stderr.strip()}\n{log}")
        self._wait_ready()

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (dropping an older one) and return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def clone_database(self, source: str, name: str) -> str:
        """A copy of database ``source`` (no one may be connected to it) as ``name``; returns its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        return self.url(name)
