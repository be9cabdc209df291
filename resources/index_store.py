"""Index store: versioned FAISS index folders under the home, published by an atomic rename.

Layout::

    {home}/index/versions/<version>/index.faiss      the FAISS index (int64 ids = vector ids)
    {home}/index/versions/<version>/manifest.json    model fingerprint, dimension, metric, nlist, nprobe, count, ...
    {home}/index/CURRENT                             name of the published version (replaced atomically)

A version is written into a temporary folder, fsynced, renamed into ``versions/`` and only then named
in ``CURRENT``; a reader therefore sees the old version or the new one, never a half-written one, and a
crash at any point leaves the last published version loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from resources.locks import file_lock

MANIFEST_FORMAT = 1


class IndexStoreError(RuntimeError):
    """No usable published index, or publishing failed; the message says which folder and why."""


@dataclass(frozen=True)
class PublishedIndex:
    version: str
    path: Path
    manifest: dict[str, Any]

    @property
    def index_file(self) -> Path:
        return self.path / "index.faiss"


class IndexStoreResource(ConfigurableResource):
    """Owns `{home}/index`: writes new versions, publishes them atomically, prunes old ones."""

    home: str = Field(description="Pipeline home folder; indexes live in `{home}/index`.")
    keep_versions: int = Field(default=3, description="Published versions kept on disk (the current one included).")

    @property
    def root(self) -> Path:
        return Path(self.home) / "index"

    def current(self) -> PublishedIndex | None:
        """The published version, or None when nothing was published yet."""
        pointer = self.root / "CURRENT"
        try:
            version = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        path = self.root / "versions" / version
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise IndexStoreError(f"published index {path} has no readable manifest.json: {exc}") from exc
        return PublishedIndex(version=version, path=path, manifest=manifest)

    @contextlib.contextmanager
    def new_version(self) -> Iterator[Path]:
        """A scratch folder to write a version into; removed if the block raises."""
        scratch = self.root / "staging" / f"tmp-{uuid.uuid4().hex}"
        try:
            scratch.mkdir(parents=True)
        except OSError as exc:
            raise IndexStoreError(f"cannot write under {self.root} (EMBEDDING_HOME): {exc}") from exc
        try:
            yield scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def publish(self, scratch: Path, manifest: dict[str, Any]) -> PublishedIndex:
        """Write the manifest into ``scratch``, move it into place and point CURRENT at it."""
        created = datetime.now(timezone.utc)
        version = f"{created.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}"
        manifest = {"format": MANIFEST_FORMAT, "version": version, "created": created.isoformat(), **manifest}
        try:
            _write_synced(scratch / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
            for file in scratch.iterdir():
                _fsync_file(file)
            versions = self.root / "versions"
            versions.mkdir(parents=True, exist_ok=True)
            with file_lock(self.root / "publish.lock", exclusive=True, timeout=300):
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
        versions = sorted(p for p in (self.root / "versions").iterdir() if p.is_dir())
        old = [p for p in versions if p.name != keep][: max(0, len(versions) - max(1, self.keep_versions))]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        staging = self.root / "staging"
        if staging.exists():  # leftovers of crashed runs older than a day
            cutoff = datetime.now().timestamp() - 86400
            for path in staging.iterdir():
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)


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
