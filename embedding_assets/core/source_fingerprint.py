"""The fingerprint of a source folder from file metadata only: what the sources sensor compares between
ticks, and what ``raw_documents`` records so the sensor knows the state a run outside it ingested."""

from __future__ import annotations

from pathlib import Path

from embedding_assets.core.identity import sha256_hex
from embedding_assets.core.sources import metadata_lines

EMPTY_SOURCE = "empty"  # fingerprint of a folder without files: never ingested (a half-created folder)


def source_fingerprint(folder: Path) -> str:
    """Fingerprint of a source folder's file metadata: sha256 over sorted ``relative path, size, mtime_ns, mode``.

    Walks exactly what ``core.sources.scan_source`` walks (``metadata_lines`` over ``walk_source``: hidden paths ignored,
    symlinked folders not followed, names that are not UTF-8 escaped), so the sensor and the run agree
    on what a source holds. Paths that are refused or cannot be read (a folder without permission, a
    symlink loop) enter with their reason, so fixing one is a change and triggers a run; one stray
    path never stops the sensor from fingerprinting the rest. Returns ``EMPTY_SOURCE`` when the
    folder holds nothing. Raises OSError only when ``folder`` itself cannot be listed.
    """
    lines = metadata_lines(folder)
    if not lines:
        return EMPTY_SOURCE
    return sha256_hex("\n".join(lines))
