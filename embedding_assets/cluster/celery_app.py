"""The Celery app the workers run (``celery -A embedding_assets.cluster.celery_app worker``, wrapped by
``embedding-pipeline worker``): dagster-celery's step task over the broker from the project's settings."""

from __future__ import annotations

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from embedding_assets.cluster.executor import celery_app_args

app = make_app(celery_app_args())

execute_plan = create_task(app)
