"""Shared helpers for tests that run the real asset graph (real model, real DuckDB or PostgreSQL, temp home)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from embedding_assets.definitions import build_definitions
from embedding_assets.runner import materialize_index, materialize_source
from resources import (
    DocumentSourcesResource,
    EmbeddingCacheResource,
    EmbeddingModelResource,
    IndexStoreResource,
    WarehouseResource,
)

FIXTURE_CORPUS = Path(__file__).parent / "fixtures" / "corpus"
QUERIES = json.loads((FIXTURE_CORPUS / "QUERIES.json").read_text())


@dataclass
class Pipeline:
    """A pipeline on its own sources folder and home, run through the real Dagster jobs."""

    sources_root: Path
    home: Path
    defs: dg.Definitions
    instance: dg.DagsterInstance
    resources: dict

    @property
    def warehouse(self) -> WarehouseResource:
        return self.resources["warehouse"]

    def run_source(self, source: str, **kwargs) -> dict:
        return materialize_source(self.defs, self.instance, source, **kwargs)

    def run_index(self, **kwargs) -> dict:
        return materialize_index(self.defs, self.instance, **kwargs)

    def run_all(self, sources=("alpha", "beta")) -> tuple[dict, dict]:
        reports = {s: self.run_source(s) for s in sources}
        return reports, self.run_index()

    def rows(self, sql: str, params=None) -> list[tuple]:
        return self.warehouse.query_rows(sql, params)

    def search(self, query: str, k: int = 5):
        from embedding_assets.search import search

        return search(query, k, model=self.resources["model"], index_store=self.resources["index_store"])


def make_pipeline(tmp_path: Path, instance: dg.DagsterInstance, *, redis_url: str | None = None, copy_corpus=True,
                  warehouse_url: str | None = None, **model_kwargs) -> Pipeline:
    """A pipeline under ``tmp_path``; ``warehouse_url`` (postgresql://...) puts its warehouse in PostgreSQL."""
    sources_root = tmp_path / "sources"
    home = tmp_path / "home"
    if copy_corpus:
        for source in ("alpha", "beta"):
            shutil.copytree(FIXTURE_CORPUS / source, sources_root / source)
    else:
        sources_root.mkdir(parents=True, exist_ok=True)
    resources = {
        "sources": DocumentSourcesResource(root=str(sources_root)),
        "warehouse": WarehouseResource(home=str(home), url=warehouse_url),
        "index_store": IndexStoreResource(home=str(home)),
        "model": EmbeddingModelResource(**model_kwargs),
        "cache": EmbeddingCacheResource(home=str(home), redis_url=redis_url, redis_retry_seconds=0.5),
    }
    return Pipeline(sources_root, home, build_definitions(resources), instance, resources)


def index_count(published) -> int:
    """Vectors held by the FAISS index of a published version (either layout)."""
    from embedding_assets.core.index_version import IndexVersion

    return int(IndexVersion.open(published.path).index.ntotal)
