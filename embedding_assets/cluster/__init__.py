"""Running past one machine: a local PostgreSQL for tests and the demo, the Celery worker, the cluster demo."""
