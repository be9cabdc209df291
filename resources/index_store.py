"""Index store: self-contained index versions under the home, published by an atomic rename.

Layout::

    {home}/index/versions/<version>/     one folder per version (see embedding_assets.core.index_version)
    {home}/index/CURRENT                 name of the published version (replaced atomically)
    {home}/index/staging/                versions being written, and build scratch
    {home}/index/build.lock              held for a whole build: at most one build at a time
    {home}/index/publish.lock            held while CURRENT moves and old versions are pruned

The folder can be elsewhere (``index_dir``, EMBEDDING_INDEX_DIR: a shared filesystem for a cluster). With
``lock_url`` (the PostgreSQL warehouse) the two locks are PostgreSQL advisory locks instead of lock files,
so builds on different machines exclude each other too.

A version is written into a staging folder, its files' sizes and sha256 go into the manifest, the folder
is fsynced, renamed into ``versions/`` and only then named in ``CURRENT``; a reader sees the old version or
the new one, never a half-written one, and a crash at any point leaves the last published version loadable.

A current version whose files are missing or damaged is passed over for the newest intact one, with one
warning; a build then publishes a fresh version (never an incremental update of the damaged one).
Reading needs no warehouse and no lock: search never waits for a writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from embedding_assets.core import index_version as iv
from resources.locks import LockTimeout, file_lock

log = logging.getLogger(__name__)


class IndexStoreError(RuntimeError):
    """No usable published index, or publishing failed; the message says which folder and why."""


@dataclass(frozen=True)
class PublishedIndex:
    version: str
    path: Path
    manifest: dict[str, Any]
    fallback_from: str | None = None  # the damaged version CURRENT names, when this one was chosen instead

    @property
    def layout(self) -> str:
        return self.manifest.get("layout", "int8")

    @property
    def index_file(self) -> Path:
        return self.path / iv.INDEX_FILE[self.layout]


class IndexStoreResource(ConfigurableResource):
    """Owns `{home}/index`: writes new versions, publishes them atomically, prunes old ones, opens the current one."""

    home: str = Field(description="Pipeline home folder; indexes live in `{home}/index`.")
    keep_versions: int = Field(default=3, description="Published versions kept on disk (the current one included).")
    build_lock_timeout_seconds: float = Field(
        default=3600.0, description="How long a build waits for another build of the same home to finish."
    )
    index_dir: str | None = Field(
        default=None,
        description="Where versions live (EMBEDDING_INDEX_DIR), default `{home}/index`; on several machines a "
        "shared folder every worker and search process sees.",
    )
    lock_url: str | None = Field(
        default=None,
        description="postgresql://... (EMBEDDING_WAREHOUSE_URL): builds and publishes lock in PostgreSQL (advisory "
        "locks), so no two builds on any machines publish at once; unset: lock files under the index folder.",
    )

    @property
    def root(self) -> Path:
        return Path(self.index_dir) if self.index_dir else Path(self.home) / "index"

    # ---------------------------------------------------------------------------------- reading

    def current(self, *, verify: str = "sizes") -> PublishedIndex | None:
        """The published version, or None when nothing was published yet.

        When the version CURRENT names is missing or damaged (``verify``: ``"sizes"`` checks every file's
        presence and size, ``"full"`` their sha256 too), the newest intact version is returned instead with
        ``fallback_from`` naming the damaged one, and one warning is logged. Raises IndexStoreError when
        versions were published but none is intact.
        """
        named = self._read_pointer()
        if named is None and not self._version_dirs():
            return None
        if named is not None:
            problem = self._problem(self.root / "versions" / named, verify)
            if problem is None:
                return self._published(named)
        else:
            problem = "CURRENT is missing or unreadable"
        for path in sorted(self._version_dirs(), reverse=True):
            if path.name != named and self._problem(path, verify) is None:
                _warn_once(f"index version {named or '(none)'} under {self.root} is unusable ({problem}); "
                           f"using the newest intact version {path.name}; the next materialize publishes a new one")
                return self._published(path.name, fallback_from=named or "CURRENT")
        raise IndexStoreError(
            f"no intact index version under {self.root} ({problem}): run `embedding-pipeline materialize` to build one"
        )

    def open_current(self) -> iv.IndexVersion:
        """The current version opened for searching (cached per version in this process).

        Raises IndexStoreError when nothing is published or no version is intact.
        """
        published = self.current()
        if published is None:
            raise IndexStoreError(f"no index published under {self.root}: run `embedding-pipeline materialize` first")
        try:
            return _open_cached(str(published.path), published.version)
        except iv.IndexVersionError as exc:  # damaged between the check and the open: drop it, try the next one
            _OPENED.pop((str(published.path), published.version), None)
            raise IndexStoreError(str(exc)) from exc

    def _read_pointer(self) -> str | None:
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        return name or None

    def _version_dirs(self) -> list[Path]:
        versions = self.root / "versions"
        return [p for p in versions.iterdir() if p.is_dir()] if versions.is_dir() else []

    @staticmethod
    def _problem(path: Path, verify: str) -> str | None:
        """Why the version in ``path`` cannot be served, or None."""
        try:
            manifest = json.loads((path / iv.MANIFEST_FILE).read_text())
        except (OSError, ValueError) as exc:
            return f"no readable {iv.MANIFEST_FILE}: {exc}"
        if manifest.get("format") != iv.FORMAT:
            return f"format {manifest.get('format')} is not {iv.FORMAT} (built by another release)"
        try:
            missing = [name for name in iv.files_of(manifest["layout"]) if name not in manifest["files"]]
            if missing:
                return f"the manifest does not list {', '.join(missing)}"
            for name, recorded in manifest["files"].items():
                file = path / name
                if not file.is_file():
                    return f"{name} is missing"
                if file.stat().st_size != recorded["bytes"]:
                    return f"{name} has {file.stat().st_size} bytes, the manifest says {recorded['bytes']}"
                if verify == "full" and iv.file_digest(file)["sha256"] != recorded["sha256"]:
                    return f"{name} does not match its sha256"
        except (KeyError, TypeError, ValueError) as exc:
            return f"manifest lacks {exc}"
        except OSError as exc:
            return f"unreadable: {exc}"
        return None

    def _published(self, version: str, fallback_from: str | None = None) -> PublishedIndex:
        path = self.root / "versions" / version
        return PublishedIndex(version, path, json.loads((path / iv.MANIFEST_FILE).read_text()), fallback_from)

    # ---------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def build_lock(self) -> Iterator[None]:
        """Held for a whole build, snapshot to publish: builds of one home run one at a time, in order."""
        self._mkdir(self.root)
        try:
            with self._lock("build", timeout=self.build_lock_timeout_seconds):
                yield
        except LockTimeout as exc:
            raise IndexStoreError(f"{exc}: another index build is still running") from None

    def _lock(self, name: str, *, timeout: float) -> contextlib.AbstractContextManager[None]:
        """The ``build`` or ``publish`` lock: a PostgreSQL advisory lock with ``lock_url`` (every machine sees
        it, and a killed holder's session lets it go), else an flock on ``{root}/{name}.lock`` (one machine)."""
        if self.lock_url:
            from resources.warehouse import resolved_url
            from resources.warehouse.postgres_backend import advisory_lock

            return advisory_lock(resolved_url(self.lock_url), f"index_{name}", timeout=timeout)  # one deployment per database
        return file_lock(self.root / f"{name}.lock", exclusive=True, timeout=timeout)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private work folder under staging/, removed afterwards whatever happens."""
        folder = self.root / "staging" / f"work-{uuid.uuid4().hex}"
        self._mkdir(folder)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def new_version(self) -> Iterator[Path]:
        """A scratch folder to write a version into; removed if the block raises."""
        scratch = self.root / "staging" / f"tmp-{uuid.uuid4().hex}"
        self._mkdir(scratch)
        try:
            yield scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexStoreError(f"cannot write under {self.root} (EMBEDDING_HOME): {exc}") from exc

    def publish(self, scratch: Path, manifest: dict[str, Any]) -> PublishedIndex:
        """Record the files' sizes and sha256 in the manifest, move ``scratch`` into place and point CURRENT at it."""
        created = datetime.now(timezone.utc)
        version = f"{created.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}"
        try:
            files = {p.relative_to(scratch).as_posix(): iv.file_digest(p) for p in iv.version_files(scratch)}
            manifest = {**manifest, "version": version, "created": created.isoformat(), "files": files}
            _write_synced(scratch / iv.MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True).encode())
            for file in iv.version_files(scratch) + [scratch / iv.MANIFEST_FILE]:
                _fsync_file(file)
            for folder in [p for p in scratch.rglob("*") if p.is_dir()] + [scratch]:
                _fsync_dir(folder)
            versions = self.root / "versions"
            versions.mkdir(parents=True, exist_ok=True)
            with self._lock("publish", timeout=300):
                final = versions / version
                os.rename(scratch, final)
                _fsync_dir(versions)
                _write_synced(self.root / "CURRENT.tmp", version.encode())
                os.replace(self.root / "CURRENT.tmp", self.root / "CURRENT")
                _fsync_dir(self.root)
                self._prune(keep=version)
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise IndexStoreError(f"publishing an index under {self.root} failed; the previous version stays current: {exc}") from exc
        return PublishedIndex(version=version, path=self.root / "versions" / version, manifest=manifest)

    def _prune(self, keep: str) -> None:
        versions = sorted(self._version_dirs())
        old = [p for p in versions if p.name != keep][: max(0, len(versions) - max(1, self.keep_versions))]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        staging = self.root / "staging"
        if staging.exists():  # leftovers of crashed runs older than a day
            cutoff = datetime.now().timestamp() - 86400
            for path in staging.iterdir():
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        shutil.rmtree(path, ignore_errors=True)


# Opened versions, per (path, version); a few at most, so a hot swap keeps the previous one until it is replaced.
_OPENED: dict[tuple[str, str], iv.IndexVersion] = {}
_OPENED_LOCK = threading.Lock()
_OPENED_MAX = 2
_WARNED: set[str] = set()


def _open_cached(path: str, version: str) -> iv.IndexVersion:
    key = (path, version)
    with _OPENED_LOCK:
        opened = _OPENED.get(key)
        if opened is None:
            opened = iv.IndexVersion.open(Path(path))
            _OPENED[key] = opened
            while len(_OPENED) > _OPENED_MAX:
                _OPENED.pop(next(iter(_OPENED)))
        return opened


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
