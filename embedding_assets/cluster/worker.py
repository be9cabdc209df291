"""``embedding-pipeline worker``: a Celery worker for the pipeline's steps, with the project's settings."""

from __future__ import annotations

import os
import socket
import sys

from embedding_assets.cluster.executor import DEFAULT_QUEUE, GPU_QUEUE, broker_env_var


def worker_command(*, name: str | None, queues: list[str], concurrency: int, loglevel: str = "INFO") -> list[str]:
    """The celery command line of a worker listening on ``queues`` (default ``dagster`` and ``gpu``)."""
    broker_env_var()  # fails with a clear message before starting anything when no broker is set
    return [
        sys.executable, "-m", "celery", "-A", "embedding_assets.cluster.celery_app", "worker",
        "--prefetch-multiplier=1", "--loglevel", loglevel, "--concurrency", str(concurrency),
        "-Q", ",".join(queues or [DEFAULT_QUEUE, GPU_QUEUE]),
        "-n", f"{name or 'embedding'}@{socket.gethostname()}",
    ]  # fmt: skip


def run_worker(*, name: str | None, queues: list[str], concurrency: int) -> int:
    """Become the Celery worker (exec): this process's id is the worker's, so a supervisor's SIGTERM reaches
    Celery's warm shutdown and a SIGKILL kills the worker itself. A child process would be orphaned instead:
    Python's default SIGTERM ends the wrapper and leaves the worker running with nobody watching it."""
    command = worker_command(name=name, queues=queues, concurrency=concurrency)
    os.execv(command[0], command)  # noqa: S606 - the celery command built by worker_command from fixed parts
    return 1  # unreachable: execv replaces the process or raises OSError
