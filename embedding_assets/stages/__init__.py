"""The seven stages, one module each, in data-flow order.

Each stage is a plain function over the warehouse (and model, cache, index store where it needs
them) with no Dagster import, so the assets stay thin and the stages are testable on their own.
Every stage is incremental: it compares what its inputs are now with what it last derived from them
(content hashes plus the fingerprint of its settings) and does only the difference, deletions included.
"""

from __future__ import annotations

from collections.abc import Callable

# progress(stage, done, total, unit): called from long loops; total may be 0 when unknown.
ProgressFn = Callable[[str, int, int, str], None]


def no_progress(stage: str, done: int, total: int, unit: str) -> None:
    return None
