"""Document sources resource: the folder whose subfolders are the sources (partitions)."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from embedding_assets.core.sources import SkippedFile, find_sources, list_sources


class DocumentSourcesResource(ConfigurableResource):
    """Where documents come from: every subfolder of ``root`` is one source and one partition."""

    root: str = Field(description="Sources root folder (EMBEDDING_SOURCES_DIR); each subfolder is a source.")
    max_file_bytes: int = Field(
        default=20 * 1024 * 1024,
        description="Files larger than this are skipped and recorded with the reason (EMBEDDING_MAX_FILE_BYTES).",
    )

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def source_names(self) -> list[str]:
        """The sources under ``root``; entries refused as sources are logged (see ``refused_sources``)."""
        return list_sources(self.root_path)

    def refused_sources(self) -> list[SkippedFile]:
        """Entries under ``root`` that are not sources, each with the reason (bad name, symlink leaving
        the root, a loose file...): for reports, so that no folder is ignored silently."""
        return find_sources(self.root_path).refused
