"""The search and embedding service: ``embedding-pipeline serve`` (FastAPI on uvicorn).

One module per concern:

- ``config``: ``ServiceSettings`` from ``EMBEDDING_*`` variables (limits, batching, keys);
- ``api``: the request and response shapes (OpenAI ``/v1/embeddings``, ``/search``) as pure functions,
  and ``ApiError``, the one exception type every 4xx/5xx answer is built from;
- ``security``: API keys (``Authorization: Bearer``, constant-time compare, never logged);
- ``batching``: ``EmbeddingBatcher``, dynamic batching of concurrent requests through the pipeline's
  cache and model, off the event loop;
- ``metrics``: Prometheus text exposition (counters, histograms, gauges), no dependency;
- ``page``: the server-rendered search page (works without JavaScript);
- ``app``: ``create_app`` wires the resources, routes, hot index swaps and lifecycle together.

The service reads only the published index version and the embedding cache; it never imports the
warehouse (a test keeps it so).
"""

from embedding_assets.service.app import create_app, create_app_from_env
from embedding_assets.service.config import ServiceSettings

__all__ = ["ServiceSettings", "create_app", "create_app_from_env"]
