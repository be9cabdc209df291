"""Document sources resource: the folder whose subfolders are the sources (partitions)."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from embedding_assets.core.sources import list_sources


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
        return list_sources(self.root_path)
