"""Progress of long loops: logged to Dagster (the UI shows it) and drawn on a terminal when the CLI asks.

The CLI runs jobs in-process, so it registers a terminal reporter here; under ``dagster dev`` no
reporter is registered and progress only goes to the run's log, at most every few seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from embedding_assets.stages import ProgressFn

LOG_EVERY_SECONDS = 5.0
_terminal: Callable[[str, int, int, str], None] | None = None


def set_terminal_reporter(reporter: Callable[[str, int, int, str], None] | None) -> None:
    global _terminal
    _terminal = reporter


def for_context(context) -> ProgressFn:
    """A ProgressFn that logs through ``context.log`` (throttled) and feeds the terminal reporter."""
    started = time.monotonic()
    last_log = [0.0]

    def report(stage: str, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if _terminal is not None:
            _terminal(stage, done, total, unit)
        if now - last_log[0] >= LOG_EVERY_SECONDS or done == total:
            last_log[0] = now
            context.log.info(f"{stage}: {format_rate(done, total, unit, now - started)}")

    return report


def format_rate(done: int, total: int, unit: str, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{done}/{total} {unit}" if total else f"{done} {unit}"
    if rate:
        text += f", {rate:.1f} {unit}/s"
        if total and done < total:
            text += f", ETA {(total - done) / rate:.0f} s"
    return text


class TerminalProgress:
    """One redrawn status line per stage on stderr (only when stderr is a terminal)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self.started: dict[str, float] = {}
        self.last_draw = 0.0

    def __call__(self, stage: str, done: int, total: int, unit: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        self.started.setdefault(stage, now)
        if now - self.last_draw < 0.2 and done != total:
            return
        self.last_draw = now
        line = f"  {stage:<22} {format_rate(done, total, unit, now - self.started[stage])}"
        self.stream.write("\r\x1b[2K" + line + ("\n" if total and done >= total else ""))
        self.stream.flush()
