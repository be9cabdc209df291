"""The FastAPI app: routes, error answers, metrics, hot index swaps and the batcher's lifecycle.

Hot swap: a watcher task re-resolves the published version every ``index_poll_seconds`` on a worker
thread (``search.open_for_model``: reads CURRENT, checks the files' sizes, opens the new version once and
caches it). Requests read the served ``IndexVersion`` object once, at their start, and keep it to the
end, so a swap never changes a request's version midway; the next request gets the new one. Opening
happens on the watcher, never on a request, and no version object is closed while a request holds it
(the old one is dropped when its last reference goes). A version that turns out damaged is replaced by
the index store's fallback (the newest intact version) at the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedding_assets.core.index_version import IndexVersion
from embedding_assets.search import DEFAULT_MODE, MODES, SearchError, open_for_model, search_version
from embedding_assets.service import api
from embedding_assets.service.api import ApiError
from embedding_assets.service.batching import EmbeddingBatcher, EmbeddingFailed
from embedding_assets.service.config import ServiceSettings
from embedding_assets.service.metrics import ServiceMetrics
from embedding_assets.service.page import render_page
from embedding_assets.service.security import ApiKeys
from resources.cache import EmbeddingCacheResource
from resources.index_store import IndexStoreError, IndexStoreResource
from resources.model import DEFAULT_MODEL, EmbeddingModelResource

log = logging.getLogger("embedding_pipeline.service")

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_DEFAULT_ALIASES = {DEFAULT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass
class _State:
    """What the routes share; ``version`` is replaced whole by the watcher (one attribute write)."""

    model: EmbeddingModelResource
    cache: EmbeddingCacheResource
    index_store: IndexStoreResource
    settings: ServiceSettings
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    batcher: EmbeddingBatcher | None = None
    fingerprint: str = ""
    version: IndexVersion | None = None
    index_problem: str | None = "not looked up yet"
    model_loaded: bool = False
    model_problem: str | None = None

    def refresh_index(self) -> IndexVersion | None:
        """Re-resolve the published version (blocking: call on a worker thread)."""
        try:
            version = open_for_model(self.index_store, self.fingerprint)
        except IndexStoreError as exc:
            self.index_problem = str(exc)
            if self.version is None:
                return None
            # The served version stays: its files are open and a broken CURRENT must not take search down.
            log.warning("keeping index version %s: %s", self.version.version, exc)
            return self.version
        if self.version is None or version.version != self.version.version:
            if self.version is not None:
                self.metrics.index_swaps.inc()
                log.info("serving index version %s (was %s)", version.version, self.version.version)
            self.metrics.index_version.replace(1, version=version.version)
            self.metrics.index_vectors.set(version.count)
        self.version, self.index_problem = version, None
        return version


def create_app(*, model: EmbeddingModelResource, cache: EmbeddingCacheResource, index_store: IndexStoreResource,
               settings: ServiceSettings | None = None) -> FastAPI:
    """The service app over the given resources (the same objects the pipeline builds from settings)."""
    state = _State(model=model, cache=cache, index_store=index_store, settings=settings or ServiceSettings())
    keys = ApiKeys(state.settings.api_keys)
    served_name = model.model
    model_names: set[str] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _one_faiss_thread()
        # Fingerprint and dimension read the model folder (no weights): on a thread, once.
        state.batcher = await run_in_threadpool(
            lambda: EmbeddingBatcher(model, cache, state.metrics, max_wait_s=state.settings.batch_wait_ms / 1000,
                                     token_budget=state.settings.batch_tokens, cache_writes=state.settings.cache_writes))
        state.fingerprint = state.batcher.fingerprint
        model_names.update({model.model, model.model_path().name, state.fingerprint})
        if model.model in _DEFAULT_ALIASES:
            model_names.update(_DEFAULT_ALIASES)
        await state.batcher.start()
        await run_in_threadpool(state.refresh_index)
        tasks = [asyncio.create_task(_warm_up(state)), asyncio.create_task(_watch_index(state))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.batcher.close()

    app = FastAPI(title="embedding-pipeline service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = state
    app.add_middleware(_MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code="http_error").body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(api.invalid_value(str(exc.errors())[:500]).body(), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(ApiError(500, "internal error; the service log has the details",
                                     type="server_error", code="internal_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        keys.check(request.headers.get("authorization"))

    async def embed(texts: list[str]):
        try:
            return await state.batcher.embed(texts)
        except EmbeddingFailed as exc:
            raise ApiError(500, f"embedding failed: {exc}", type="server_error", code="embedding_failed") from None

    async def run_search(request: api.SearchRequest) -> dict[str, Any]:
        version = state.version or await run_in_threadpool(state.refresh_index)  # held for the whole request
        if version is None:
            raise ApiError(503, state.index_problem or "no index published", type="service_unavailable",
                           code="no_index")
        vector = None if request.mode == "lexical" else (await embed([request.query])).vectors[0]
        try:
            hits = await run_in_threadpool(search_version, version, request.query, vector, request.k,
                                           mode=request.mode, source=request.source,
                                           per_document=request.per_document)
        except SearchError as exc:  # e.g. a lexical mode on a version built without the lexical index
            raise api.invalid_value(str(exc), "mode") from None
        return {"query": request.query, "k": request.k, "source": request.source, "mode": request.mode or DEFAULT_MODE,
                "chunks": not request.per_document, "index_version": version.version,
                "hits": [api.hit_json(hit) for hit in hits]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        authorize(request)
        data = api.parse_json_object(await _read_body(request, state.settings.max_body_bytes))
        parsed = api.parse_embeddings_request(data, state.settings, model_names=model_names,
                                              dimension=state.batcher.dimension)
        embedded = await embed(parsed.texts)
        return JSONResponse(api.embeddings_response(embedded.vectors, parsed.encoding_format, served_name,
                                                    embedded.tokens))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "embedding-pipeline"}]}

    @app.get("/search")
    async def search_get(request: Request):
        authorize(request)
        return await run_search(api.parse_search(dict(request.query_params), state.settings))

    @app.post("/search")
    async def search_post(request: Request):
        authorize(request)
        data = api.parse_json_object(await _read_body(request, state.settings.max_body_bytes))
        return await run_search(api.parse_search(data, state.settings))

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        authorize(request)
        params = dict(request.query_params)
        query = params.get("q", "")
        try:
            k = min(max(int(params.get("k", api.DEFAULT_K)), 1), state.settings.max_k)
        except ValueError:
            k = api.DEFAULT_K
        mode = params.get("mode") if params.get("mode") in MODES else DEFAULT_MODE
        served = state.version.version if state.version else None
        if not query.strip():
            return HTMLResponse(render_page(k=k, mode=mode, index_version=served), headers=PAGE_HEADERS)
        try:
            result = await run_search(api.parse_search({"q": query, "k": k, "mode": mode}, state.settings))
        except ApiError as exc:
            return HTMLResponse(render_page(query=query, k=k, mode=mode, error=exc.message, index_version=served,
                                            searched=True), status_code=exc.status, headers=PAGE_HEADERS)
        return HTMLResponse(render_page(query=query, k=k, mode=mode, hits=result["hits"],
                                        index_version=result["index_version"], searched=True), headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        body = {"ready": state.model_loaded and state.version is not None, "model_loaded": state.model_loaded,
                "index_version": state.version.version if state.version else None,
                "problems": [p for p in (state.model_problem, state.index_problem) if p]}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.registry.render(), media_type=state.metrics.registry.CONTENT_TYPE)

    return app


def create_app_from_env() -> FastAPI:
    """The app over the pipeline's own resources (``embedding_assets.settings``) and ``ServiceSettings.from_env``."""
    from embedding_assets.settings import cache_resource, index_store_resource, model_resource

    return create_app(model=model_resource(), cache=cache_resource(), index_store=index_store_resource(),
                      settings=ServiceSettings.from_env())


def _one_faiss_thread() -> None:
    """FAISS searches one query per call on a request thread: an OpenMP team per call only adds
    hand-offs and spin-waits on the cores the model's batches need (single-query tails of 10-50 ms were
    seen under load with the default team). Process-wide, so only the service sets it."""
    import faiss

    faiss.omp_set_num_threads(1)


async def _warm_up(state: _State) -> None:
    started = time.perf_counter()
    try:
        await state.batcher.warm_up()
    except Exception as exc:  # noqa: BLE001 - reported by /ready; requests get the same error
        state.model_problem = f"the model did not load: {type(exc).__name__}: {exc}"
        log.error("%s", state.model_problem)
        return
    state.model_loaded = True
    state.metrics.model_loaded.set(1)
    log.info("model ready in %.1f s", time.perf_counter() - started)


async def _watch_index(state: _State) -> None:
    while True:
        await asyncio.sleep(state.settings.index_poll_seconds)
        try:
            await run_in_threadpool(state.refresh_index)
        except Exception:  # noqa: BLE001 - the watcher must survive anything; the next poll retries
            log.exception("looking for a new index version failed")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise api.too_large(f"the request body has {declared} bytes; the limit is {limit} (EMBEDDING_MAX_BODY_BYTES)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise api.too_large(f"the request body is over the limit of {limit} bytes (EMBEDDING_MAX_BODY_BYTES)")
    return bytes(body)


class _MetricsMiddleware:
    """Counts requests and times them per route template (bounded labels; unknown paths are "other")."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.inc(route=route, method=scope["method"], status=str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - started, route=route)


__all__ = ["create_app", "create_app_from_env"]
