"""Resources: everything that touches the outside world (model, cache tiers, DuckDB, index files, sources).

Names are imported lazily (PEP 562), so ``from resources.index_store import ...`` in a search process does
not import the warehouse (DuckDB) or the cache (Redis) modules.
"""

from __future__ import annotations

import importlib

_MODULES = {
    "DocumentSourcesResource": "resources.sources",
    "EmbeddingCacheResource": "resources.cache",
    "EmbeddingModelResource": "resources.model",
    "IndexStoreResource": "resources.index_store",
    "WarehouseResource": "resources.warehouse",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'resources' has no attribute {name!r}")
