"""``embedding-pipeline worker``: a Celery worker for the pipeline's steps, with the project's settings."""

from __future__ import annotations

import os
import socket
import subprocess
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
    """Run the worker in the foreground until it stops; returns its exit code."""
    return subprocess.call(worker_command(name=name, queues=queues, concurrency=concurrency), env=dict(os.environ))  # noqa: S603 - the celery command built by worker_command from fixed parts
