"""Dynamic batching: concurrent requests share one model call, off the event loop.

Each request's texts are first tokenized (only counted) on a one-thread tokenizer pool, then queued.
One worker task takes the first queued request and everything already queued behind it, up to
``token_budget`` tokens; it waits (at most ``max_wait_s``, a few milliseconds) only for requests already
on their way (being tokenized), never on speculation: a lone request runs at once. It then runs the
batch on a one-thread encode pool:

1. cache lookup with the pipeline's key (``identity.embedding_cache_key(model fingerprint,
   text_sha256(text))``) through every tier, so a text the pipeline embedded (a chunk's contextual text) is a hit here;
2. the audit the embeddings stage does: a sample of the hits that came from Redis is re-embedded, and a
   mismatch makes this cache object distrust Redis (those hits are re-embedded);
3. the model (``EmbeddingModelResource.encode`` with the known token counts: its CPU streams and
   token-budget packing run over the whole batch) for the distinct texts no tier held;
4. every vector checked (``vector_checks.invalid_rows``), the model's written back to the cache.

While a batch runs, new requests queue up and form the next batch, so under load batches grow by
themselves; at low load a request does not wait (a fixed 3 ms gathering window measured 11.7 ms p50 at
one client against the plain service's 5.7 ms: benchmarks/RESULTS.md). One worker per process means one model
call at a time: the model resource already spreads a call over the CPU cores (streams).

Failure modes: a failing cache tier is counted and logged (the texts are embedded by the model);
an invalid vector from the model or any model error fails the requests of that batch only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from dataclasses import dataclass

import numpy as np

from embedding_assets.core.identity import embedding_cache_key, text_sha256
from embedding_assets.core.vector_checks import AUDIT_MIN_COSINE, audit_sample_size, invalid_rows, mismatched
from embedding_assets.service.metrics import ServiceMetrics
from resources.cache import EmbeddingCacheError, EmbeddingCacheResource
from resources.model import EmbeddingModelResource

log = logging.getLogger("embedding_pipeline.service")


class EmbeddingFailed(RuntimeError):
    """The model failed or returned an invalid vector for a batch; its requests get a 500 naming this."""


@dataclass(frozen=True)
class Embedded:
    """Vectors (n, dim) float32 unit-norm in input order, and the tokens the model saw (special tokens
    included, truncated to the model's max length): OpenAI's ``usage.prompt_tokens``."""

    vectors: np.ndarray
    tokens: int


@dataclass
class _Request:
    texts: list[str]
    lengths: list[int]  # tokens per text as the model sees them (special tokens, truncation)
    future: asyncio.Future


class EmbeddingBatcher:
    """One per process and model; ``start()`` inside the event loop, ``embed()`` from request handlers."""

    def __init__(self, model: EmbeddingModelResource, cache: EmbeddingCacheResource, metrics: ServiceMetrics, *,
                 max_wait_s: float = 0.003, token_budget: int = 8192, cache_writes: bool = True,
                 rng: random.Random | None = None):
        self.model, self.cache, self.metrics = model, cache, metrics
        self.max_wait_s, self.token_budget, self.cache_writes = max_wait_s, token_budget, cache_writes
        self.rng = rng or random.SystemRandom()  # the audit sample must not be predictable by a cache writer
        self.fingerprint = model.model_fingerprint()
        self.dimension = model.dimension()
        self.max_length = model.effective_max_seq_length()
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed-batch")
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: _Request | None = None  # a request that did not fit the last batch's budget
        self._on_the_way = 0  # requests being tokenized: the only ones a batch waits for
        self._arrived: asyncio.Event | None = None

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="embedding-batcher")

    async def warm_up(self) -> None:
        """Load the model (on the encode thread, so it never races a batch)."""
        await asyncio.get_running_loop().run_in_executor(self._encode_pool, lambda: self.model.encode(["warm up"], [2]))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        pending = [self._carry] if self._carry else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for request in pending:
            if not request.future.done():
                request.future.set_exception(EmbeddingFailed("the service is shutting down"))
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._encode_pool.shutdown(wait=True)

    # ---------------------------------------------------------------------------- requests

    async def embed(self, texts: list[str]) -> Embedded:
        """Embed ``texts`` in a shared batch. Raises EmbeddingFailed."""
        if self._queue is None:
            raise EmbeddingFailed("the batcher is not started")
        loop = asyncio.get_running_loop()
        self._on_the_way += 1
        try:
            lengths = await loop.run_in_executor(self._tokenize_pool, self._lengths, texts)
        finally:
            self._on_the_way -= 1
            self._arrived.set()  # a gathering batch waiting for this one stops waiting, queued or not
        request = _Request(texts, lengths, loop.create_future())
        self._queue.put_nowait(request)
        return await request.future

    def _lengths(self, texts: list[str]) -> list[int]:
        ids = self.model.tokenizer()(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [min(len(i) + 2, self.max_length) for i in ids]

    # ---------------------------------------------------------------------------- the worker

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(loop)
            started = time.perf_counter()
            texts = [t for r in batch for t in r.texts]
            lengths = [n for r in batch for n in r.lengths]
            try:
                vectors = await loop.run_in_executor(self._encode_pool, self._process, texts, lengths)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request, logged once here
                log.error("embedding a batch of %d texts failed: %s: %s", len(texts), type(exc).__name__, exc)
                error = exc if isinstance(exc, EmbeddingFailed) else EmbeddingFailed(f"{type(exc).__name__}: {exc}")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.batch_texts.observe(len(texts))
            self.metrics.batch_tokens.observe(sum(lengths))
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            start = 0
            for request in batch:
                end = start + len(request.texts)
                if not request.future.done():  # a client that went away cancelled its future
                    request.future.set_result(Embedded(vectors[start:end], sum(request.lengths)))
                start = end

    async def _gather(self, loop) -> list[_Request]:
        """The next batch: the first request, everything queued behind it, and the requests being tokenized
        that are queued within max_wait_s; up to the token budget."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, tokens = [first], sum(first.lengths)
        deadline = loop.time() + self.max_wait_s
        while tokens < self.token_budget:
            try:
                request = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if not self._on_the_way or remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                continue
            if tokens + sum(request.lengths) > self.token_budget:
                self._carry = request
                break
            batch.append(request)
            tokens += sum(request.lengths)
        return batch

    def _process(self, texts: list[str], lengths: list[int]) -> np.ndarray:
        """Cache, audit, model, check, write back (runs on the encode thread)."""
        keys = [embedding_cache_key(self.fingerprint, text_sha256(t)) for t in texts]
        try:
            hits = self.cache.lookup(keys, self.dimension, unit_norm=True)
        except EmbeddingCacheError as exc:
            self.metrics.cache_errors.inc()
            log.warning("embedding cache lookup failed, embedding %d texts with the model: %s", len(texts), exc)
            hits = [None] * len(texts)
        for hit in hits:
            if hit is None:
                self.metrics.cache_misses.inc()
            else:
                self.metrics.cache_hits.inc(tier=hit.tier)

        shared = [i for i, hit in enumerate(hits) if hit is not None and hit.shared]
        sample: list[int] = []
        if shared and "redis" not in self.cache.distrusted():
            sample = sorted(self.rng.sample(shared, audit_sample_size(len(shared), self.cache.effective_audit_rate())))
        fresh = self._encode(texts, lengths, keys, [i for i, hit in enumerate(hits) if hit is None] + sample)
        if sample:
            wrong = mismatched(np.stack([hits[i].vector for i in sample]), np.stack([fresh[keys[i]] for i in sample]),
                               AUDIT_MIN_COSINE)
            if wrong.any():
                self.cache.distrust("redis", f"{int(wrong.sum())} of {len(sample)} audited vectors served to the "
                                             "embedding service are not the model's")
        if "redis" in self.cache.distrusted():
            distrusted = [i for i in shared if keys[i] not in fresh]
            hits = [None if hit is not None and hit.shared else hit for hit in hits]
            fresh.update(self._encode(texts, lengths, keys, distrusted))

        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        for i, hit in enumerate(hits):
            vectors[i] = hit.vector if hit is not None else fresh[keys[i]]
        bad = np.flatnonzero(invalid_rows(vectors, self.dimension))
        if len(bad):
            raise EmbeddingFailed(f"the model returned {len(bad)} invalid vectors (NaN, inf or not unit norm); "
                                  "check EMBEDDING_DTYPE and the model folder")
        written = {keys[i]: vectors[i] for i, hit in enumerate(hits) if hit is None}
        if written and self.cache_writes:
            try:
                self.cache.set_many(list(written.items()))
            except EmbeddingCacheError as exc:
                self.metrics.cache_errors.inc()
                log.warning("writing %d embeddings to the cache failed (they were served): %s", len(written), exc)
        return vectors

    def _encode(self, texts: list[str], lengths: list[int], keys: list[str], which: list[int]) -> dict[str, np.ndarray]:
        """Model vectors of the distinct texts at ``which``, by cache key."""
        first: dict[str, int] = {}
        for i in which:
            first.setdefault(keys[i], i)
        if not first:
            return {}
        positions = list(first.values())
        # The model takes counts without special tokens; truncated texts are truncated again by the model.
        computed, _ = self.model.encode([texts[i] for i in positions], [max(0, lengths[i] - 2) for i in positions])
        self.metrics.model_texts.inc(len(positions))
        return {keys[i]: computed[j] for j, i in enumerate(positions)}
