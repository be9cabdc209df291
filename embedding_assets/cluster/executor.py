"""Which executor runs a run's steps: in-process (one machine, the default) or Celery (many machines).

``EMBEDDING_EXECUTOR=celery`` selects dagster-celery: every step becomes a Celery task on the broker
(``EMBEDDING_CELERY_BROKER``, default ``EMBEDDING_REDIS_URL``), results in the same Redis, picked up by
``embedding-pipeline worker`` processes on any machine. Steps go to the ``dagster`` queue, except the
``embeddings`` step, tagged for the ``gpu`` queue (``GPU_QUEUE``): start GPU workers with
``--queue gpu --concurrency 1`` (one step per GPU at a time) and CPU workers with ``--queue dagster``;
one worker with both queues serves a CPU-only cluster.

The broker and backend are bound as ``{"env": ...}`` so their passwords never land in run config.
"""

from __future__ import annotations

import os

import dagster as dg

EXECUTORS = ("in_process", "celery")
DEFAULT_QUEUE = "dagster"
GPU_QUEUE = "gpu"
# dagster-celery reads the queue of a step from this op tag (dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG).
QUEUE_TAG = "dagster-celery/queue"


class ExecutorSettingError(ValueError):  # explained as one "error:" line by the CLI (a ValueError)
    """EMBEDDING_EXECUTOR or the broker setting cannot be used; the message says what to set."""


def executor_name() -> str:
    """``EMBEDDING_EXECUTOR``: ``in_process`` or ``celery`` (SettingError naming the variable otherwise)."""
    from embedding_assets.settings import load_settings

    return load_settings().executor


def broker_env_var() -> str:
    """The variable holding the Celery broker URL: EMBEDDING_CELERY_BROKER, else EMBEDDING_REDIS_URL.

    The name, not the value, is handed on (the URL may hold a password)."""
    from embedding_assets.settings import Settings, load_settings

    settings = load_settings()
    for field in ("celery_broker", "redis_url"):
        if getattr(settings, field) is not None:
            return Settings.env_name(field)
    raise ExecutorSettingError(
        "EMBEDDING_EXECUTOR=celery needs a broker: set EMBEDDING_CELERY_BROKER (or EMBEDDING_REDIS_URL) to redis://host:port/db"
    )


def visibility_timeout_seconds() -> int:
    """EMBEDDING_CELERY_VISIBILITY_TIMEOUT_SECONDS: how long a step's task may stay unacknowledged before the
    broker hands it to another worker. A worker that dies with its machine (SIGKILL, power cut) never
    acknowledges its step; after this timeout a live worker runs the step again and the run goes on. Set it
    above the longest step: a step still running past it is started a second time on another worker (the
    stages are idempotent and serialized by the warehouse lock, so that wastes work but duplicates nothing).
    A bad value raises SettingError naming the variable."""
    from embedding_assets.settings import load_settings

    return load_settings().celery_visibility_timeout_seconds


def celery_app_args() -> dict:
    """The Celery app settings shared by the executor (submitting) and the workers (consuming)."""
    url = os.environ[broker_env_var()]
    return {
        "broker": url,
        "backend": url,
        "include": [],
        # A task is acknowledged after it ran: a worker killed mid-step leaves it to the run's failure
        # handling instead of silently losing it; prefetch 1 so a long step does not hold others back.
        # A task whose worker died unacknowledged goes back to the queue after the visibility timeout; the
        # broker sweeps for such tasks every 10 s (kombu's default sweeps only every 10th interval: 100 s).
        "config_source": {
            "task_acks_late": True,
            "worker_prefetch_multiplier": 1,
            "task_default_queue": DEFAULT_QUEUE,
            "broker_transport_options": {
                "visibility_timeout": visibility_timeout_seconds(),
                "unacked_restore_interval": 10,
                "unacked_restore_throttle": 1,
            },
        },
    }


def pipeline_executor() -> dg.ExecutorDefinition:
    """The executor of the code location's jobs, from EMBEDDING_EXECUTOR."""
    if executor_name() == "in_process":
        # A run's steps form a chain that shares the model and the warehouse: one process loads the model once
        # per run instead of once per step. Runs themselves still go to separate processes (the run launcher).
        return dg.in_process_executor
    from dagster_celery import celery_executor

    broker = {"env": broker_env_var()}
    return celery_executor.configured(
        {"broker": broker, "backend": broker, "config_source": celery_app_args()["config_source"]},
        name="celery",
    )
