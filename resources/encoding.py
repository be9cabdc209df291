"""Batched forward passes with out-of-memory backoff: the model resource's encode loop, free of Dagster.

:func:`plan_batches` packs length-sorted texts into batches of at most ``token_budget`` padded tokens;
:func:`run_batches` runs them (pipelined on a pool) and, when a forward pass runs out of accelerator
memory, frees the cache, halves the batch and retries each half, down to one text. After a halving the
smaller size caps every later batch of the same call, so a call that hit the wall does not keep hitting it.

Imported by ``resources.model`` and by ``benchmarks/gpu_encode.py``, which runs on a machine without Dagster.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

# The model input the known-item benchmark measured best for the default model (benchmarks/RESULTS.md,
# "Chunk size and model input"); the pipeline's EMBEDDING_MAX_SEQ_LENGTH default too. Here, not in
# resources.model, so reading the settings does not import Dagster.
DEFAULT_MAX_SEQ_LENGTH = 384

log = logging.getLogger("embedding_pipeline.model")


def user_cache_dir() -> Path:
    """This user's cache folder for what a machine derives from a model (``$XDG_CACHE_HOME`` or ~/.cache):
    the weights-digest memo, the tokenizer checks (resources/tokenizer.py), int8 builds (resources/int8.py)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedding-pipeline"


def stat_key(path: Path) -> list[int]:
    """size, mtime, ctime, inode, device of a file: a rewrite always moves it (a program cannot set ctime back)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def read_entries(memo: Path) -> dict:
    """A JSON memo's entries; {} when it is missing, unreadable or not an object."""
    try:
        entries = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def remember_entry(memo: Path, key: str, value, keep: int = 32) -> None:
    """Add ``key -> value`` to a JSON memo (the newest ``keep`` entries), written whole by an atomic rename.
    A memo that cannot be written is skipped (a read-only home: the value is computed again next time)."""
    scratch = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        entries = read_entries(memo)
        entries.pop(key, None)
        entries[key] = value
        scratch.write_text(json.dumps(dict(list(entries.items())[-keep:])))
        os.replace(scratch, memo)
    except OSError as exc:
        log.debug("cannot write the memo %s: %s", memo, exc)
        try:
            scratch.unlink(missing_ok=True)
        except OSError:
            pass


class ModelConfigError(ValueError):
    """The model setting cannot be used; the message names the setting and what to do."""


class ModelOutOfMemoryError(MemoryError):
    """A forward pass of a single text ran out of accelerator memory: nothing is left to split."""


class _OutOfMemory:
    """What a forward pass that ran out of memory returns instead of raising.

    The exception is turned into this marker inside the worker so its traceback (whose frames hold the
    batch's activations) is dropped there, before the cache is emptied and the halves are retried.
    """

    def __init__(self, exc: BaseException):
        self.message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA, and MPS's RuntimeError that says so)."""
    import torch

    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if k)
    if kinds and isinstance(exc, kinds):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_accelerator_memory() -> None:
    """Give the allocator's cached blocks back (CUDA, MPS), so the halves start from a clean pool."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps.empty_cache()


def plan_batches(lengths: np.ndarray, token_budget: int, max_batch: int) -> list[np.ndarray]:
    """Group positions into batches by descending length so each batch's padded size fits the budget.

    ``lengths`` are per-text token counts including special tokens. Returns index arrays; every
    position appears exactly once. A single text longer than the budget gets a batch of its own.
    """
    if token_budget < 1 or max_batch < 1:
        raise ModelConfigError("token_budget and batch_size must be >= 1 (EMBEDDING_TOKEN_BUDGET, EMBEDDING_BATCH_SIZE)")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for pos in order:
        length = int(lengths[pos])
        width = max(longest, length)  # sorted descending, so the first item sets the width
        if current and (width * (len(current) + 1) > token_budget or len(current) >= max_batch):
            batches.append(np.asarray(current))
            current, longest = [], 0
            width = length
        current.append(int(pos))
        longest = width
    if current:
        batches.append(np.asarray(current))
    return batches


def guarded(forward: Callable[..., np.ndarray]) -> Callable[..., np.ndarray | _OutOfMemory]:
    """``forward`` that returns an :class:`_OutOfMemory` marker instead of raising out-of-memory errors."""

    def run(*args):
        try:
            return forward(*args)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is caught; the rest re-raised
            if not is_out_of_memory(exc):
                raise
            return _OutOfMemory(exc)

    return run


def run_batches(
    batches: Sequence[np.ndarray],
    lengths: np.ndarray,
    out: np.ndarray,
    submit: Callable[[np.ndarray], object],
    *,
    max_pending: int,
    token_budget: int,
    device: str = "",
) -> list[np.ndarray]:
    """Run every batch through ``submit`` and write its rows of ``out``; return the batches really run.

    ``submit(batch)`` tokenizes on the calling thread and returns a future of the batch's (n, dim) rows or of
    an :class:`_OutOfMemory` marker (wrap the forward pass with :func:`guarded`). At most ``max_pending``
    futures are in flight. Rows land at their batch's positions, so order is kept whatever the splits.

    Out of memory: the batch is halved (one warning each time) and each half retried, recursively; the
    half's padded size then caps every batch run after it in this call (the other half and later batches
    are re-packed to fit it); the cap is only ever lowered. A single text that runs out of memory raises :class:`ModelOutOfMemoryError` naming its tokens.
    Other exceptions from the forward pass propagate unchanged.
    """
    cap = None  # padded tokens per batch once a batch has run out of memory; only ever lowered
    ran: list[np.ndarray] = []

    def padded(batch: np.ndarray) -> int:
        return int(lengths[batch].max()) * len(batch)

    def settle(batch: np.ndarray, result) -> None:
        if not isinstance(result, _OutOfMemory):
            out[batch] = result
            ran.append(batch)
            return
        halve(batch, result)

    def halve(batch: np.ndarray, oom: _OutOfMemory) -> None:
        nonlocal cap
        free_accelerator_memory()
        tokens = padded(batch)
        if len(batch) == 1:
            raise ModelOutOfMemoryError(
                f"out of memory embedding a single text of {tokens} tokens{' on ' + device if device else ''} "
                f"({oom.message}); it cannot be split further. EMBEDDING_TOKEN_BUDGET={token_budget} only bounds "
                "batches of several texts: free accelerator memory (other processes), lower "
                "EMBEDDING_MAX_SEQ_LENGTH, or run on EMBEDDING_DEVICE=cpu"
            )
        half = (len(batch) + 1) // 2
        first, second = batch[:half], batch[half:]
        cap = min(cap or tokens, max(padded(first), padded(second)))
        log.warning(
            "out of memory on a batch of %d texts (%d padded tokens)%s; halving it and capping the rest of this "
            "encode at %d padded tokens (EMBEDDING_TOKEN_BUDGET=%d)",
            len(batch), tokens, " on " + device if device else "", cap, token_budget,
        )  # fmt: skip
        for part in (first, second):  # re-packed to the cap as it stands, so a sibling never repeats a failure
            for piece in fitted(part):
                settle(piece, submit(piece).result())

    def fitted(batch: np.ndarray) -> list[np.ndarray]:
        if cap is None or padded(batch) <= cap:
            return [batch]
        return [batch[piece] for piece in plan_batches(lengths[batch], cap, len(batch))]

    pending: collections.deque = collections.deque()
    for planned in batches:
        for batch in fitted(planned):
            pending.append((batch, submit(batch)))
            while len(pending) > max_pending or (pending and pending[0][1].done()):
                done, future = pending.popleft()
                settle(done, future.result())
    while pending:
        done, future = pending.popleft()
        settle(done, future.result())
    return ran


def run_on(pool: Executor, prepare: Callable[[np.ndarray], object], forward: Callable[[object], np.ndarray]):
    """A ``submit`` for :func:`run_batches`: ``prepare(batch)`` here, ``forward(features)`` on ``pool``."""
    safe = guarded(forward)
    return lambda batch: pool.submit(safe, prepare(batch))


def embed_features(model, features: dict, autocast) -> np.ndarray:
    """One forward pass: sentence embeddings as float32, normalized in the model's dtype as
    ``SentenceTransformer.encode(normalize_embeddings=True)`` does (so vectors match that path)."""
    import torch

    with torch.inference_mode(), autocast():  # inference mode is per thread: entered in the worker
        embeddings = model(features)["sentence_embedding"]
        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
    return embeddings.float().cpu().numpy()
