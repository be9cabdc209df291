"""FAISS IVF index building and nprobe tuning (stage ``faiss_index``).

The index is described by one ``faiss.index_factory`` string (``"IVF512,Flat"``,
``"IVF512,SQ8"``, or ``"IDMap2,Flat"`` for corpora too small to cluster) and always uses the
inner-product metric on L2-normalized float32 vectors, i.e. cosine similarity.

Sizing follows the FAISS guidelines: about ``4 * sqrt(n)`` lists, and at least 39 training
points per centroid (below that FAISS warns and k-means centroids are poor). ``nprobe`` is
not guessed: it is tuned against exact top-k ground truth computed by streaming the
vectors, so memory stays bounded by one batch.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

MIN_POINTS_PER_CENTROID = 39
FLAT_FACTORY = "IDMap2,Flat"
# Rows of an L2-normalized float32 matrix are within this of unit length; anything further
# off was not normalized, and inner product would stop meaning cosine similarity.
_UNIT_NORM_TOLERANCE = 1e-3


class IndexBuildError(ValueError):
    """An index that cannot be built or filled: bad factory, too few training points, bad vectors."""


def choose_nlist(n_vectors: int, *, min_nlist: int = 8, per_sqrt: float = 4.0) -> int:
    """Number of inverted lists for ``n_vectors``: ``round(per_sqrt * sqrt(n))``.

    Capped at ``n // 39`` so every centroid has at least 39 training points. Returns 0,
    meaning "use a flat index", when that cap is below ``min_nlist`` (clustering a few
    hundred vectors buys nothing).
    """
    if n_vectors < 0:
        raise ValueError(f"n_vectors must be >= 0, got {n_vectors}")
    cap = n_vectors // MIN_POINTS_PER_CENTROID
    if cap < min_nlist:
        return 0
    return max(min_nlist, min(round(per_sqrt * math.sqrt(n_vectors)), cap))


def factory_string(n_vectors: int, template: str = "IVF{nlist},Flat", **choose_kwargs) -> str:
    """The ``index_factory`` string for ``n_vectors``.

    ``template`` gets the chosen ``nlist`` (e.g. ``"IVF{nlist},SQ8"``); when
    ``choose_nlist`` returns 0 the answer is ``"IDMap2,Flat"``, exact search with ids.
    """
    nlist = choose_nlist(n_vectors, **choose_kwargs)
    return FLAT_FACTORY if nlist == 0 else template.format(nlist=nlist)


def _unit_float32_rows(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise IndexBuildError(f"{what} must have shape (n, {dim}), got {vectors.shape}")
    if vectors.dtype != np.float32:
        raise IndexBuildError(f"{what} must be float32, got {vectors.dtype}")
    if not np.all(np.isfinite(vectors)):
        raise IndexBuildError(f"{what} contains NaN or infinite values")
    norms = np.linalg.norm(vectors, axis=1)
    if vectors.shape[0] and np.max(np.abs(norms - 1.0)) > _UNIT_NORM_TOLERANCE:
        raise IndexBuildError(
            f"{what} are not L2-normalized (norms from {norms.min():.4f} to {norms.max():.4f}); "
            "encode with normalize_embeddings=True or faiss.normalize_L2 first"
        )
    return np.ascontiguousarray(vectors)


def ivf_nlist(index: faiss.Index) -> int:
    """Number of inverted lists of an IVF index (through any wrappers); 0 for a non-IVF index."""
    ivf = faiss.try_extract_index_ivf(index)
    return 0 if ivf is None else int(ivf.nlist)


def build_index(factory: str, dim: int, training_vectors: np.ndarray) -> faiss.Index:
    """An empty, trained inner-product index from a factory string.

    ``training_vectors``: float32 (n, dim), L2-normalized. For IVF the sample must hold at
    least ``39 * nlist`` vectors; a factory that needs no training ignores it.
    Raises IndexBuildError on an unknown factory string, too small a sample, or bad vectors.
    """
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise IndexBuildError(f"faiss cannot build factory {factory!r} for dim={dim}: {error}") from error
    if index.is_trained:
        return index
    training_vectors = _unit_float32_rows(training_vectors, dim, "training vectors")
    nlist = ivf_nlist(index)
    needed = max(MIN_POINTS_PER_CENTROID * nlist, 1)
    if training_vectors.shape[0] < needed:
        raise IndexBuildError(
            f"factory {factory!r} with nlist={nlist} needs >= {needed} training vectors "
            f"({MIN_POINTS_PER_CENTROID} per centroid), got {training_vectors.shape[0]}: "
            "train on a larger sample or use fewer lists"
        )
    index.train(training_vectors)
    return index


def add_vectors(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add float32 L2-normalized ``vectors`` (n, dim) under int64 ``ids`` (n,).

    Raises IndexBuildError on an untrained index, mismatched shapes or wrong dtypes.
    """
    if not index.is_trained:
        raise IndexBuildError("index is not trained: build it with build_index first")
    vectors = _unit_float32_rows(vectors, index.d, "vectors")
    ids = np.asarray(ids)
    if ids.dtype != np.int64 or ids.shape != (vectors.shape[0],):
        raise IndexBuildError(
            f"ids must be int64 of shape ({vectors.shape[0]},), got {ids.dtype} {ids.shape}"
        )
    index.add_with_ids(vectors, np.ascontiguousarray(ids))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set how many lists a search visits. No-op for a flat index.

    Raises ValueError unless ``1 <= nprobe <= nlist``.
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    if not 1 <= nprobe <= ivf.nlist:
        raise ValueError(f"nprobe must be in [1, {ivf.nlist}] for this index, got {nprobe}")
    ivf.nprobe = int(nprobe)


def exact_top_k(
    queries: np.ndarray,
    vector_batches: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
) -> np.ndarray:
    """Exact inner-product top-k ids (nq, k) int64, streaming ``(ids, vectors)`` batches.

    Each batch is scored and merged into a running top-k, so memory is bounded by one batch
    times the queries. Rows are ordered by descending score, ties by ascending id. When
    fewer than k vectors exist the rest of a row is padded with -1.
    """
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be 2-D (nq, dim), got shape {queries.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    nq = queries.shape[0]
    best_scores = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_ids = np.full((nq, 0), -1, dtype=np.int64)
    for batch_ids, batch_vectors in vector_batches:
        batch_ids = np.asarray(batch_ids, dtype=np.int64)
        batch_vectors = np.asarray(batch_vectors, dtype=np.float32)
        if batch_vectors.shape != (batch_ids.shape[0], queries.shape[1]):
            raise ValueError(
                f"batch vectors shape {batch_vectors.shape} does not match "
                f"{batch_ids.shape[0]} ids of dim {queries.shape[1]}"
            )
        if batch_ids.size == 0:
            continue
        scores = np.concatenate([best_scores, queries @ batch_vectors.T], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(batch_ids, (nq, batch_ids.size))], axis=1)
        best_scores, best_ids = _top_k(scores, ids, k)
    padding = k - best_ids.shape[1]
    return np.pad(best_ids, ((0, 0), (0, padding)), constant_values=-1) if padding else best_ids


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score desc, id asc) of ``scores``/``ids``, sorted."""
    # Sorting is deterministic under ties, which argpartition is not; the matrices are
    # only (nq, k + batch) so the sort is cheap next to the matrix product.
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |found ∩ truth| / |truth| within the first k columns.

    -1 entries (padding where fewer than k results exist) are ignored on both sides, so a
    query with 3 true neighbours that finds all 3 scores 1.0. Queries with no true
    neighbour are skipped; with none left the recall is 1.0.
    """
    found_ids = np.asarray(found_ids)[:, :k]
    true_ids = np.asarray(true_ids)[:, :k]
    if found_ids.shape[0] != true_ids.shape[0]:
        raise ValueError(
            f"found_ids has {found_ids.shape[0]} queries, true_ids has {true_ids.shape[0]}"
        )
    recalls = []
    for found, truth in zip(found_ids, true_ids):
        truth = truth[truth != -1]
        if truth.size:
            recalls.append(np.isin(truth, found[found != -1]).sum() / truth.size)
    return float(np.mean(recalls)) if recalls else 1.0


def required_recall(target: float, queries: int, k: int, z: float = 1.645) -> float:
    """Recall the sample must show so that ``target`` holds beyond it: ``target + z * sqrt(t(1-t)/(queries*k))``.

    A normal bound on the ``queries * k`` neighbour hits, capped at 1.0.
    """
    if queries <= 0 or k <= 0 or not 0.0 < target < 1.0:
        return target  # nothing to estimate; a target of 1 or more stays what it is (unreachable above 1)
    return min(1.0, target + z * float(np.sqrt(target * (1.0 - target) / (queries * k))))


def tune_nprobe(
    index: faiss.Index,
    queries: np.ndarray,
    true_ids: np.ndarray,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    z: float = 1.645,
) -> tuple[int, float]:
    """Smallest nprobe of a float index whose recall@k against ``true_ids`` reaches ``target_recall`` with a margin.

    See :func:`tune_search`; leaves the index set to the chosen nprobe. A flat index returns ``(0, its recall)``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def search(nprobe: int) -> np.ndarray:
        if nprobe:
            set_nprobe(index, nprobe)
        return index.search(queries, k)[1]

    nprobe, recall = tune_search(search, ivf_nlist(index), true_ids, k=k, target_recall=target_recall, queries=len(queries), z=z)
    if nprobe:
        set_nprobe(index, nprobe)
    return nprobe, recall


def tune_search(
    search,
    nlist: int,
    true_ids: np.ndarray,
    *,
    k: int = 10,
    target_recall: float = 0.95,
    queries: int | None = None,
    z: float = 1.645,
) -> tuple[int, float]:
    """Smallest nprobe in [1, nlist] for which ``search(nprobe)`` (found ids, (nq, k)) reaches the recall target.

    The sampled queries only estimate recall; the smallest nprobe that just reaches the target on
    them misses it on other queries about half of the time. So the bar is
    :func:`required_recall` (``z`` = 1.645: the target holds out of sample with ~95% confidence);
    ``z=0`` tunes to the bare target.

    Tries 1, 2, 4, ... up to nlist, then binary-searches between the last miss and the first
    hit (recall grows with nprobe). Returns ``(nprobe, measured recall)``. If even nlist misses
    the bar (lossy codes), returns ``(nlist, its recall)`` so the caller can report the shortfall.
    With ``nlist == 0`` (a flat index) returns ``(0, recall of search(0))``.
    """
    queries = len(true_ids) if queries is None else queries
    bar = required_recall(target_recall, queries, k, z)
    if nlist == 0:
        return 0, recall_at_k(search(0), true_ids, k)
    recall_at: dict[int, float] = {}

    def recall_with(nprobe: int) -> float:
        if nprobe not in recall_at:
            recall_at[nprobe] = recall_at_k(search(nprobe), true_ids, k)
        return recall_at[nprobe]

    miss, hit = 0, None
    nprobe = 1
    while True:
        if recall_with(nprobe) >= bar:
            hit = nprobe
            break
        miss = nprobe
        if nprobe == nlist:
            break
        nprobe = min(nprobe * 2, nlist)
    if hit is None:
        return nlist, recall_at[nlist]
    while hit - miss > 1:
        middle = (miss + hit) // 2
        if recall_with(middle) >= bar:
            hit = middle
        else:
            miss = middle
    return hit, recall_at[hit]


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted, distinct row positions (int64) of a deterministic sample of ``size`` out of ``n``.

    ``size >= n`` returns every position.
    """
    if n < 0 or size < 0:
        raise ValueError(f"n and size must be >= 0, got n={n}, size={size}")
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


# Fragments of a chunk's text used as tuning queries: as long as a search phrase or a short question. Chosen by
# measurement (RESULTS.md, issue 14): fragments of 4-12 words put the tuned setting where the benchmark's
# heading and sentence queries keep recall@10 0.96; 8-20-word fragments sit nearer their chunk and tuned to
# 0.948-0.959 (and to 0.945 for 4-12-word queries in tests/test_text_query_recall.py).
QUERY_FRAGMENT_WORDS = (4, 12)


def query_texts(rows: Iterable[tuple[str | None, str]], seed: int = 1) -> list[str]:
    """Query-like texts of sampled corpus rows, one per row of ``(heading, text)``: for every other row its
    ``heading`` (the last heading, else the title) when it has one not used yet, otherwise a run of
    ``QUERY_FRAGMENT_WORDS`` (4-12, and at most half of a row of 8+ words; 4 of a shorter row) consecutive
    words of ``text`` at a seeded random position.

    Why: real queries are short texts whose vectors sit far from every chunk (top-1 cosine ~0.5-0.7), while
    a corpus vector's neighbours are close (0.8-0.95) and easy to find; recall tuned on corpus vectors
    overstates what a text query sees (benchmarks/RESULTS.md, issue 14). Headings and text fragments embedded
    by the model land where real queries do. Deterministic for the same rows and seed.
    """
    rng = np.random.default_rng(seed)
    low, high = QUERY_FRAGMENT_WORDS
    used: set[str] = set()
    out = []
    for position, (heading, text) in enumerate(rows):
        heading = " ".join((heading or "").split())
        length = int(rng.integers(low, high + 1))  # drawn for every row, so one row's choice does not shift the rest
        start_draw = float(rng.random())
        if position % 2 == 0 and heading and heading.lower() not in used:
            used.add(heading.lower())
            out.append(heading)
            continue
        words = (text or "").split()
        # At most half of a short row: a whole row as query would find itself and overstate recall.
        length = min(length, max(low, len(words) // 2))
        start = int(start_draw * max(len(words) - length + 1, 1))
        out.append(" ".join(words[start: start + length]) or heading)
    return out


def write_index(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        faiss.write_index(index, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_index(path: str | os.PathLike) -> faiss.Index:
    """Read an index written by ``write_index``. Raises FileNotFoundError if ``path`` is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FAISS index at {path}")
    return faiss.read_index(str(path))


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove vectors by int64 id (IVF or IDMap2); returns how many were removed."""
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    if ids.size == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(ids)))


def centroid_similarity(index: faiss.Index, vectors: np.ndarray) -> float | None:
    """Mean inner product of ``vectors`` to their nearest IVF centroid; None for a flat index.

    Compared with the value measured on the training sample, it tells whether new data still
    fits the trained quantizer (data drift lowers it).
    """
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or len(vectors) == 0:
        return None
    similarity, _ = ivf.quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return float(np.mean(similarity))


def retrain_reason(
    *,
    nlist: int,
    trained_count: int,
    live_count: int,
    flat_would_be_ivf: bool,
    trained_similarity: float | None,
    added_similarity: float | None,
    max_growth: float = 2.0,
    min_similarity_ratio: float = 0.9,
    added_count: int | None = None,
    min_drift_sample: int = 64,
) -> str | None:
    """Why the published index must be retrained before vectors are added, or None if it still fits.

    A flat index never needs training, until the corpus grows past the flat threshold. An IVF
    index is retrained when the corpus grew past ``max_growth`` times (or shrank below 1/``max_growth``
    of) the count it was trained on, or when the added vectors sit clearly farther from their
    centroids than the training sample did (drift). Drift is judged only on at least ``min_drift_sample``
    added vectors (``added_count``; None means enough): the mean of a handful is noise.
    """
    if nlist == 0:
        return "the corpus grew past the flat-index threshold" if flat_would_be_ivf else None
    if live_count > max_growth * trained_count:
        return f"{live_count} vectors > {max_growth:g}x the {trained_count} the quantizer was trained on"
    if live_count * max_growth < trained_count:
        return f"{live_count} vectors < 1/{max_growth:g} of the {trained_count} the quantizer was trained on"
    enough = added_count is None or added_count >= min_drift_sample
    if enough and trained_similarity and added_similarity is not None and added_similarity < min_similarity_ratio * trained_similarity:
        return (
            f"drift: added vectors are {added_similarity:.3f} similar to their centroids, "
            f"training vectors {trained_similarity:.3f}"
        )
    return None
