"""Out-of-memory backoff in EmbeddingModelResource.encode (resources/encoding.py: run_batches).

The out-of-memory error is injected at the forward-pass boundary: ``resources.model._embed`` is wrapped so
that a batch above N padded tokens raises ``torch.OutOfMemoryError`` (what CUDA raises) before any work; the
real model computes every vector that is returned. The real thing on a GPU is in benchmarks/RESULTS.md
(gpu-encode section): a 2 GiB memory cap on an H100, the run completes by halving with identical vectors.
"""

from __future__ import annotations

import concurrent.futures
import logging

import numpy as np
import pytest
import torch

import resources.model as model_module
from resources.encoding import ModelOutOfMemoryError, guarded, is_out_of_memory, plan_batches, run_batches, run_on
from resources.model import EmbeddingModelResource, ModelConfigError

WORDS = "the quick brown fox jumps over a lazy dog while the model embeds every chunk of text".split()


def _texts(n: int, seed: int = 3) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for _ in range(n)]


class _Injector:
    """Wraps the forward pass: batches above ``limit`` padded tokens raise torch.OutOfMemoryError."""

    def __init__(self, forward, limit: int):
        self.forward, self.limit = forward, limit
        self.raised: list[int] = []
        self.ran: list[int] = []

    def __call__(self, model, features, autocast):
        padded = int(features["input_ids"].numel())
        if padded > self.limit:
            self.raised.append(padded)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {padded} tokens (injected)")
        self.ran.append(padded)
        return self.forward(model, features, autocast)


# --------------------------------------------------------------------------- the scheduler alone (no model)


def _rows(lengths: np.ndarray, batch: np.ndarray) -> np.ndarray:
    return np.stack([np.full(4, float(i)) + lengths[i] for i in batch])


@pytest.mark.parametrize("max_pending", [1, 2, 4])
def test_run_batches_splits_failing_batches_and_caps_the_rest(max_pending, caplog):
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 200, size=3000)
    budget, limit = 8000, 1500
    raised: list[int] = []

    def forward(batch):
        padded = int(lengths[batch].max()) * len(batch)
        if padded > limit:
            raised.append(padded)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return _rows(lengths, batch)

    out = np.full((len(lengths), 4), np.nan)
    planned = plan_batches(lengths, budget, 1000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING, "embedding_pipeline.model"):
        ran = run_batches(planned, lengths, out, run_on(pool, lambda b: b, forward), max_pending=max_pending,
                          token_budget=budget)  # fmt: skip
    assert np.array_equal(out, _rows(lengths, np.arange(len(lengths))))  # every row, at its own position
    assert sorted(np.concatenate(ran).tolist()) == list(range(len(lengths)))
    assert all(int(lengths[b].max()) * len(b) <= limit for b in ran)
    # One warning per halving; the cap keeps later batches below the wall: only the first batch and those
    # already queued when it failed can fail, a few times each, not every one of the planned batches.
    assert len(caplog.records) == len(raised)
    assert len(planned) > 20 and len(raised) <= 3 * (max_pending + 1)


def test_run_batches_lets_other_errors_through():
    lengths = np.array([5, 6, 7])

    def forward(batch):
        raise ValueError("not a memory problem")

    with concurrent.futures.ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="not a memory problem"):
        run_batches([np.arange(3)], lengths, np.zeros((3, 4)), run_on(pool, lambda b: b, forward), max_pending=2,
                    token_budget=100)  # fmt: skip


def test_is_out_of_memory_knows_cuda_and_mps_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not torch's kind of error
    assert guarded(lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))().__class__.__name__ == "_OutOfMemory"


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_encode_halves_batches_that_run_out_of_memory_and_matches_the_unsplit_run(monkeypatch, caplog):
    texts = _texts(300)
    model = EmbeddingModelResource(dtype="float32", token_budget=8192, batch_size=512, cpu_streams=1)
    expected, plain_stats = model.encode(texts)
    inject = _Injector(model_module._embed, limit=1200)
    monkeypatch.setattr(model_module, "_embed", inject)
    with caplog.at_level(logging.WARNING, "embedding_pipeline.model"):
        vectors, stats = model.encode(texts)
    assert inject.raised, "the injected limit must be below the planned batches"
    assert all(padded <= 1200 for padded in inject.ran)
    assert stats.batches > plain_stats.batches and stats.texts == len(texts)
    # Same vectors, same order: only the batch composition changed (padding is masked out).
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
    assert np.all(np.sum(vectors * expected, axis=1) > 0.9999)
    messages = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(messages) == len(inject.raised)
    assert "EMBEDDING_TOKEN_BUDGET=8192" in messages[0]
    assert len(inject.raised) <= 8  # the cap holds: not one failure per planned batch


@pytest.mark.slow
def test_encode_single_text_out_of_memory_names_its_tokens_and_the_setting(monkeypatch):
    texts = _texts(40)
    long_text = " ".join(WORDS * 10)  # ~170 tokens: above the injected limit even alone
    model = EmbeddingModelResource(dtype="float32", token_budget=4096, cpu_streams=1)
    monkeypatch.setattr(model_module, "_embed", _Injector(model_module._embed, limit=100))
    with pytest.raises(ModelOutOfMemoryError, match=r"single text of \d+ tokens.*EMBEDDING_TOKEN_BUDGET=4096"):
        model.encode([*texts, long_text])


def test_auto_token_budget_and_batch_size_follow_the_device():
    # 0 = auto: the measured defaults (CUDA: benchmarks/RESULTS.md gpu-encode; CPU: benchmarks/run.py).
    cpu, cuda = EmbeddingModelResource(device="cpu", token_budget=0, batch_size=0), EmbeddingModelResource(
        device="cuda", token_budget=0, batch_size=0)  # fmt: skip
    assert (cpu.resolved_token_budget(), cpu.resolved_batch_size()) == (16384, 128)
    assert (cuda.resolved_token_budget(), cuda.resolved_batch_size()) == (65536, 4096)
    set_ = EmbeddingModelResource(device="cuda", token_budget=2048, batch_size=7)
    assert (set_.resolved_token_budget(), set_.resolved_batch_size()) == (2048, 7)
    with pytest.raises(ModelConfigError, match="EMBEDDING_TOKEN_BUDGET"):
        EmbeddingModelResource(token_budget=-1).resolved_token_budget()
    with pytest.raises(ModelConfigError, match="EMBEDDING_BATCH_SIZE"):
        EmbeddingModelResource(batch_size=-1).resolved_batch_size()
