"""The CLI's unchanged re-run without Dagster: a state a full check proved settled, remembered.

``embedding-pipeline materialize`` runs Dagster jobs; on unchanged input they find nothing to do, but
importing Dagster, opening the instance and starting the runs cost about 3.5 s, which is most of an
unchanged re-run. This module lets the CLI skip all of that, and only when it can prove a run would do
nothing:

1. A full re-run (Dagster, every stage, the index check) is *verified a no-op* when everything a run reads
   is the same after it as before it (see below): the run wrote nothing, so with the same inputs it would
   write nothing again. Only then is the state remembered, with that run's report, in
   ``{home}/unchanged.json`` (one entry per command: the sources named, ``--allow-empty``, ``--no-index``).
   A run that did any work, failed, or saw anything move while it ran remembers nothing.
2. The next ``materialize`` with the same command compares the same inputs, now, with the remembered ones.
   All equal: it prints the remembered report and exits without importing Dagster. Anything different,
   unreadable or missing: the full run, as before.

What is compared (a digest of each; nothing here opens a document or the database):

- ``sources``: each named source folder's metadata fingerprint (what the sources sensor compares: every
  file's relative path, size, mtime and mode; the run re-hashes exactly the files whose size or mtime
  moved, so it sees no more than this does);
- ``warehouse``: size, mtime, ctime, inode of ``warehouse.duckdb`` and its WAL (any committed write moves
  them; ctime cannot be set back by a program);
- ``index``: the ``CURRENT`` pointer and every file of the version it names (a damaged or replaced version
  moves them);
- ``settings``: every ``EMBEDDING_*`` variable and the variables the model libraries read (Hugging Face,
  thread counts, cache folders), the working folder (relative paths), the Python interpreter;
- ``code``: every file of this package and ``resources`` (size, mtime), and the installed distributions
  (their ``*.dist-info`` names carry the versions);
- ``machine``: host name, core count and the CPU's instruction flags (``dtype=auto`` decides on them),
  and the int8 builds this user has (``dtype=auto`` may pick one);
- ``model``: every file of the model folder the run used (and a hub cache's ``refs``);
- ``instance``: the Dagster instance's SQLite files (runs, asset index, schedules) and ``dagster.yaml``,
  after the verifying run: a run, a removed partition or a sensor tick anywhere moves them.

Not taken (the full run always happens): a PostgreSQL warehouse (``EMBEDDING_WAREHOUSE_URL``), a Dagster
instance with its own storage in ``dagster.yaml``, ``--full-check``. The memo holds digests only, never
a setting's value. It is a cache: deleting it costs one full run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embedding_assets.core.identity import sha256_hex
from embedding_assets.core.source_fingerprint import source_fingerprint
from embedding_assets.core.sources import source_dir
from resources.encoding import read_entries, remember_entry, stat_key, user_cache_dir

MEMO_NAME = "unchanged.json"
KEEP_ENTRIES = 16
# Environment variables that can change what a run does, besides EMBEDDING_* (read by the model libraries,
# the thread pools, the cache folders, and Python's import path).
ENV_PREFIXES = (
    "EMBEDDING_", "DAGSTER_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_", "TOKENIZERS_",
    "TORCH", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "OV_", "OPENVINO_", "XDG_CACHE_HOME", "HOME", "PYTHONPATH",
)  # fmt: skip
_OWN_STORAGE = re.compile(r"^(storage|run_storage|event_log_storage|schedule_storage)\s*:", re.M)
_PACKAGES = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "resources")


class NotApplicable(Exception):
    """The shortcut cannot be taken here; the reason says why (shown with ``--json`` and in tests)."""


@dataclass(frozen=True)
class Command:
    """What ``materialize`` was asked to do: the memo is per command."""

    sources: tuple[str, ...]
    allow_empty: bool
    no_index: bool

    def key(self) -> str:
        return _digest([list(self.sources), self.allow_empty, self.no_index])


@dataclass(frozen=True)
class Inputs:
    """The digests of everything a run reads, per part (the instance's part comes apart: a run moves it)."""

    parts: dict[str, str]

    def changed(self, other: Inputs) -> list[str]:
        return sorted(k for k in self.parts.keys() | other.parts.keys() if self.parts.get(k) != other.parts.get(k))


def memo_path(settings) -> Path:
    return settings.home_path / MEMO_NAME


def inputs(settings, command: Command, model_path: str | None) -> Inputs:
    """The run's inputs now, without the instance. Raises NotApplicable (with the reason) when the
    shortcut cannot be taken: a PostgreSQL warehouse, a source folder that cannot be listed or is gone."""
    if settings.warehouse_url is not None:
        raise NotApplicable("the warehouse is PostgreSQL (EMBEDDING_WAREHOUSE_URL): its state is not a local file")
    try:
        return Inputs(_parts(settings, command, model_path))
    except OSError as exc:  # a file that vanished or cannot be read while looking: the full run decides
        raise NotApplicable(f"cannot read {exc.filename or 'a file'}: {exc.strerror or exc}") from None


def _parts(settings, command: Command, model_path: str | None) -> dict[str, str]:
    return {
        "sources": _digest([[name, _source(settings.sources_path, name)] for name in command.sources]),
        "warehouse": _digest([_stat(settings.home_path / "warehouse.duckdb"), _stat(settings.home_path / "warehouse.duckdb.wal")]),
        "index": _index(settings.index_path or settings.home_path / "index"),
        "settings": _digest([_environment(), os.getcwd(), sys.executable, sys.version]),
        "code": _digest([_tree(p) for p in _PACKAGES] + [_distributions()]),
        "machine": _digest([socket.gethostname(), os.cpu_count(), _cpu_flags(), _int8_builds()]),
        "model": _model(model_path),
    }


def instance_part(settings) -> str:
    """The Dagster instance's files (after the verifying run). Raises NotApplicable for own storage."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.home_path / "dagster")
    config = home / "dagster.yaml"
    try:
        text = config.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise NotApplicable(f"cannot read {config}: {exc.strerror or exc}") from None
    if _OWN_STORAGE.search(text):
        raise NotApplicable(f"{config} configures its own storage: its state is not local files")
    files = [home / "history" / "runs.db", home / "history" / "runs" / "index.db", home / "schedules" / "schedules.db"]
    try:
        return _digest([str(home), text, [_stat(f) for f in files], [_stat(Path(f"{f}-wal")) for f in files]])
    except OSError as exc:
        raise NotApplicable(f"cannot read {exc.filename or home}: {exc.strerror or exc}") from None


def remembered(settings, command: Command) -> dict[str, Any] | None:
    """The report of the run that proved this state settled, when nothing has moved since; else None.

    Raises NotApplicable when the shortcut cannot be taken at all."""
    entry = read_entries(memo_path(settings)).get(command.key())
    if not isinstance(entry, dict) or not isinstance(entry.get("report"), dict):
        return None
    model_path = entry.get("model_path")
    now = inputs(settings, command, model_path if isinstance(model_path, str) else None)
    if _digest([now.parts, instance_part(settings)]) != entry.get("digest"):
        return None
    report = dict(entry["report"])
    report["unchanged_since"] = entry.get("at")
    return report


def remember(settings, command: Command, before: Inputs, report: dict[str, Any], model_path: str | None) -> list[str]:
    """After a successful full run: remember the state when the run was a verified no-op.

    Returns the parts that moved while the run ran ([] = remembered). Never raises for a memo it cannot
    write (a read-only home): the next run is then a full one, as without this module.
    """
    try:
        after = inputs(settings, command, model_path)
        moved = after.changed(before)
        if moved:
            return moved
        entry = {
            "digest": _digest([after.parts, instance_part(settings)]),
            "model_path": model_path,
            "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "report": report,
        }
    except NotApplicable as why:
        return [str(why)]
    remember_entry(memo_path(settings), command.key(), entry, keep=KEEP_ENTRIES)
    return []


# ---------------------------------------------------------------------------------------------- parts


def _digest(value: Any) -> str:
    return sha256_hex(json.dumps(value, sort_keys=True, default=str))


def _environment() -> list[tuple[str, str]]:
    """The variables that can change a run; DAGSTER_HOME is left out (the CLI sets it when unset: the
    instance's part names the folder it resolves to)."""
    return sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and k != "DAGSTER_HOME")


def _stat(path: Path) -> list[int] | None:
    """``stat_key`` of a file; None when absent (absence is a state too)."""
    try:
        return stat_key(path)
    except FileNotFoundError:
        return None


def _source(root: Path, name: str) -> str:
    folder = source_dir(root, name)  # SourceError for a name that can never be a source
    if not folder.is_dir():
        raise NotApplicable(f"source folder {folder} is not there")
    try:
        return source_fingerprint(folder)
    except OSError as exc:
        raise NotApplicable(f"cannot list {folder}: {exc.strerror or exc}") from None


def _index(root: Path) -> str:
    pointer = root / "CURRENT"
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return _digest(None)
    except OSError as exc:
        raise NotApplicable(f"cannot read {pointer}: {exc.strerror or exc}") from None
    if not name or "/" in name or name.startswith("."):
        raise NotApplicable(f"{pointer} does not name a version")
    return _digest([_stat(pointer), name, _tree(root / "versions" / name)])


def _tree(folder: Path) -> list:
    """(relative path, size, mtime, ctime, inode) of every file under ``folder``, sorted; byte-code caches left out."""
    out = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = Path(base, name)
            st = path.stat()
            out.append([str(path.relative_to(folder)), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return out


def _distributions() -> list[str]:
    """The installed distributions on the import path (a ``*.dist-info`` name holds the version), and the
    editable-install and ``.pth`` hooks."""
    names = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry) or not entry.endswith(("site-packages", "dist-packages")):
            continue
        names += sorted(n for n in os.listdir(entry) if n.endswith((".dist-info", ".egg-info", ".pth", ".egg-link")))
    return names


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return ""


def _int8_builds() -> list:
    base = user_cache_dir() / "int8"
    try:
        return sorted([entry.name, _stat(Path(entry.path))] for entry in os.scandir(base))
    except FileNotFoundError:
        return []


def _model(path: str | None) -> str:
    if path is None:
        return _digest(None)
    folder = Path(path)
    parts: list[Any] = [path, _tree(folder)]
    if folder.parent.name == "snapshots":  # a Hugging Face hub cache: refs/main names the snapshot in use
        parts.append(_tree(folder.parent.parent / "refs"))
    return _digest(parts)
