"""Resources: everything that touches the outside world (model, cache tiers, DuckDB, index files, sources)."""

from resources.cache import EmbeddingCacheResource
from resources.index_store import IndexStoreResource
from resources.model import EmbeddingModelResource
from resources.sources import DocumentSourcesResource
from resources.warehouse import WarehouseResource

__all__ = [
    "DocumentSourcesResource",
    "EmbeddingCacheResource",
    "EmbeddingModelResource",
    "IndexStoreResource",
    "WarehouseResource",
]
