"""Sources: folders of documents under the sources root; each subfolder is one partition.

Scanning never reads outside a source's folder: symlinks that leave it, ``..`` components and
device files, sockets and FIFOs are refused and reported with a reason, not followed.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from embedding_assets.core.formats import SUPPORTED_SUFFIXES

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SourceError(ValueError):
    """A source folder is missing, empty or misnamed; the message names the folder and what to do."""


@dataclass(frozen=True)
class SourceFile:
    """A readable document file of a source."""

    relative_path: str  # POSIX path inside the source folder
    path: Path
    size_bytes: int
    mtime_ns: int
    suffix: str


@dataclass(frozen=True)
class SkippedFile:
    relative_path: str
    reason: str


def list_sources(root: Path) -> list[str]:
    """Names of the source folders under ``root`` (sorted; hidden folders and bad names ignored)."""
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir() and not entry.is_symlink() and _SOURCE_NAME.match(entry.name)
    )


def source_dir(root: Path, source: str) -> Path:
    """The folder of ``source`` under ``root``; refuses names that could escape the root."""
    if not _SOURCE_NAME.match(source):
        raise SourceError(
            f"source name {source!r} is not allowed: use letters, digits, '.', '_' and '-' (a folder name under {root})"
        )
    return root / source


def scan_source(root: Path, source: str, *, max_file_bytes: int) -> tuple[list[SourceFile], list[SkippedFile]]:
    """All document files of a source, sorted by relative path, and the files skipped with reasons.

    Raises SourceError when the source folder does not exist.
    """
    base = source_dir(root, source)
    if not base.is_dir():
        raise SourceError(f"source folder {base} does not exist (source {source!r}, EMBEDDING_SOURCES_DIR={root})")
    real_base = base.resolve()
    files: list[SourceFile] = []
    skipped: list[SkippedFile] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        for name in list(dirnames):
            if name.startswith("."):
                dirnames.remove(name)
            elif (here / name).is_symlink():
                dirnames.remove(name)
                skipped.append(SkippedFile(_rel(here / name, base), "symlinked folder not followed"))
        for name in filenames:
            path = here / name
            rel = _rel(path, base)
            if name.startswith("."):
                continue
            reason, info = _refusal(path, real_base, max_file_bytes)
            if reason:
                skipped.append(SkippedFile(rel, reason))
                continue
            files.append(SourceFile(rel, path, info.st_size, info.st_mtime_ns, path.suffix.lower()))
    files.sort(key=lambda f: f.relative_path)
    skipped.sort(key=lambda s: s.relative_path)
    return files, skipped


def _refusal(path: Path, real_base: Path, max_file_bytes: int) -> tuple[str | None, os.stat_result | None]:
    suffix = path.suffix.lower()
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(real_base):
            return "symlink points outside the source folder", None
    try:
        info = path.stat()
    except OSError as exc:
        return f"cannot stat: {exc.strerror}", None
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (device, socket or FIFO)", None
    if suffix not in SUPPORTED_SUFFIXES:
        return f"unsupported file type {suffix or '(none)'}", None
    if info.st_size > max_file_bytes:
        return f"larger than the limit ({info.st_size} > {max_file_bytes} bytes)", None
    return None, info


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()
