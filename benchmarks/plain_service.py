"""The usual hand-written embedding service, as the load benchmark's baseline: FastAPI, a sync endpoint
per route (FastAPI runs them on its thread pool), ``encode`` per request, no batching across requests,
no cache. Same model, same dtype and same published index as the real service.

    python -m benchmarks.plain_service --port 8001     # EMBEDDING_HOME names the index home

Serves ``POST /v1/embeddings`` (``{"input": str | [str]}`` → OpenAI's shape, floats only),
``GET /search?q=&k=`` (``embedding_assets.search.search`` per request, as the CLI does) and ``GET /ready``.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from embedding_assets.search import search
from embedding_assets.settings import index_store_resource, model_resource


class EmbeddingsBody(BaseModel):
    input: str | list[str]
    model: str | None = None


def create_plain_app() -> FastAPI:
    model = model_resource()
    index_store = index_store_resource()
    # The loaded model the model resource holds (same weights and dtype as the service's): a SentenceTransformer,
    # or for dtype=int8 the OpenVINO runner, called once per request (tokenize, one forward pass).
    loaded = model._model()
    if hasattr(loaded, "encode"):
        def encode(texts: list[str]):
            return loaded.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    else:
        def encode(texts: list[str]):
            return loaded.embed(loaded.features(texts))
    app = FastAPI()

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingsBody):
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = encode(texts)
        return {"object": "list", "model": model.model,
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}

    @app.get("/search")
    def search_route(q: str, k: int = 5):
        hits = search(q, k, model=model, index_store=index_store)
        return {"query": q, "hits": [h.__dict__ for h in hits]}

    @app.get("/ready")
    def ready():
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(create_plain_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
