"""The nightly reindex schedule: rebuilds ``faiss_index`` from the current embeddings.

Each build compares the live vectors with the published index and retrains the IVF quantizer when the
corpus has grown or drifted (otherwise updates it in place), re-tunes nprobe against exact search,
and publishes atomically behind the blocking quality gates (see ``embedding_assets.checks``).

Cron from ``EMBEDDING_REINDEX_CRON`` (default ``0 3 * * *``, every night at 03:00) in the timezone
``EMBEDDING_REINDEX_TIMEZONE`` (default UTC). Stopped by default; turn it on in the UI
(Automation -> nightly_reindex).
"""

from __future__ import annotations

import dagster as dg

from embedding_assets.jobs import build_index_job
from embedding_assets.settings import SettingError, Settings, load_settings
from resources import WarehouseResource

DEFAULT_REINDEX_CRON: str = Settings.model_fields["reindex_cron"].default


def build_reindex_schedule(cron: str | None = None, timezone: str | None = None) -> dg.ScheduleDefinition:
    """The ``nightly_reindex`` schedule; ``cron``/``timezone`` default to the EMBEDDING_REINDEX_* settings, read now.

    Raises SettingError when the cron string is not valid.
    """
    if cron is None or timezone is None:
        settings = load_settings()
        cron = cron or settings.reindex_cron
        timezone = timezone or settings.reindex_timezone

    def nightly_reindex(context: dg.ScheduleEvaluationContext, warehouse: WarehouseResource):
        # Nothing to index yet: skip instead of launching a run that fails with "no vectors".
        live = warehouse.query_rows(
            "SELECT count(*) FROM chunks k JOIN chunk_dedup x USING (chunk_id) WHERE x.status = 'canonical'"
        )[0][0]
        if not live:
            return dg.SkipReason("no live chunks in the warehouse yet: materialize a source first")
        scheduled = context.scheduled_execution_time
        return dg.RunRequest(
            run_key=f"nightly_reindex:{scheduled.isoformat()}" if scheduled else None,
            tags={"embedding/trigger": "nightly_reindex"},
        )

    try:
        return dg.schedule(
            name="nightly_reindex",
            cron_schedule=cron,
            execution_timezone=timezone,
            job=build_index_job,
            default_status=dg.DefaultScheduleStatus.STOPPED,
            description=(
                f"Rebuilds faiss_index from the current embeddings ({cron}, {timezone}; EMBEDDING_REINDEX_CRON): "
                "retrains the IVF quantizer when the corpus grew or drifted, re-tunes nprobe, publishes atomically "
                "behind the quality gates. Stopped by default."
            ),
        )(nightly_reindex)
    except (dg.DagsterInvalidDefinitionError, dg.DagsterInvariantViolationError, ValueError) as exc:
        raise SettingError(f"EMBEDDING_REINDEX_CRON={cron!r} / EMBEDDING_REINDEX_TIMEZONE={timezone!r}: {exc}") from exc


# The schedule with the defaults (importable without reading the environment); the code location
# builds its own from the settings (``definitions.build_definitions``).
nightly_reindex = build_reindex_schedule(DEFAULT_REINDEX_CRON, Settings.model_fields["reindex_timezone"].default)
