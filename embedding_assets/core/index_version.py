"""A published index version: every file search needs, built from quantized codes, read without the warehouse.

A version folder holds::

    manifest.json   model fingerprint, layout, dimension, nlist, nprobe, rescore multiplier, counts,
                    recall, and the size and sha256 of every file below
    index.faiss     int8 layout: IVF (or flat) scalar-quantizer index whose per-dimension ranges ARE the
                    stored calibration ranges, so its codes are the stored int8 codes, byte for byte
    index.bfaiss    binary layout: IVF (or flat) Hamming index over the packed sign bits
    int8.npy        binary layout: the int8 codes (n, dim), read row by row (pread) only to rescore candidates
    ids.npy         sorted int64 vector ids (n,): row r of every file below belongs to ids[r]
    ranges.npy      (2, dim) float32 calibration ranges the codes were made with
    code_hashes.npy uint64 (n,): a hash of each row's int8 and binary codes, so the next build sees a vector
                    rewritten under the same id (a repaired embedding) and replaces it
    chunks.arrow    Arrow IPC file, rows in ids order: vector_id, chunk_id, source, doc_path,
                    heading_path (JSON list), title, text, page (PDF; else null) (memory-mapped; only hit rows
                    are touched)
    bm25/           optional lexical index (bm25s, Lucene BM25) over title + heading path + text of each
                    row, document numbers = rows; searched by ``lexical_search`` and fused by the caller

The two layouts (``LAYOUTS``):

- ``int8``: 4x smaller than float32. The query stays float32 and is scored against the decoded codes
  (asymmetric distance), so recall against exact float32 search is about 0.99 on sentence embeddings.
- ``binary``: 32x smaller in memory. Hamming search over the sign bits finds ``k * rescore_multiplier``
  candidates, which are rescored with the float query against their int8 codes read from
  ``int8.npy`` with positioned reads: "binary index in memory, int8 on disk" (sentence-transformers'
  embedding quantization). The codes stay in the OS page cache, shared and evictable, never in the
  process's own memory.

Nothing here imports Dagster or the warehouse: a search process needs only numpy, faiss and pyarrow.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

LAYOUTS = ("int8", "binary")
INDEX_FILE = {"int8": "index.faiss", "binary": "index.bfaiss"}
IDS_FILE = "ids.npy"
RANGES_FILE = "ranges.npy"
CODE_HASHES_FILE = "code_hashes.npy"
INT8_FILE = "int8.npy"
CHUNKS_FILE = "chunks.arrow"
MANIFEST_FILE = "manifest.json"
LEXICAL_DIR = "bm25"
# bm25s stopwords: English, as the default model is English-only.
LEXICAL_STOPWORDS = "en"
# Version of the folder format; a reader refuses versions it does not know.
FORMAT = 2
# int8 codes span 256 buckets per dimension from ranges[0] to ranges[1]: see core.quantization.
_INT8_BUCKETS = 255

CHUNK_SCHEMA = pa.schema([
    ("vector_id", pa.int64()),
    ("chunk_id", pa.string()),
    ("source", pa.string()),
    ("doc_path", pa.string()),
    ("heading_path", pa.string()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("page", pa.int32()),
])


class IndexVersionError(RuntimeError):
    """A version folder that cannot be used: missing or damaged files, unknown format; names the folder."""


def files_of(layout: str) -> list[str]:
    """Files a version of ``layout`` holds besides the manifest."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown index layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return [INDEX_FILE[layout], IDS_FILE, RANGES_FILE, CODE_HASHES_FILE, CHUNKS_FILE] + ([INT8_FILE] if layout == "binary" else [])


# ------------------------------------------------------------------------------------ building


def dequantize(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Float32 bucket centres (n, dim) of int8 codes (n, dim): ``min + (code + 128 + 0.5) * step``.

    The same reconstruction FAISS' 8-bit scalar quantizer uses, so encoding the result with a
    quantizer whose ranges are ``ranges`` gives back exactly ``code + 128``.
    """
    steps = (ranges[1] - ranges[0]) / _INT8_BUCKETS
    steps = np.where(steps == 0, 1, steps).astype(np.float32)
    return (ranges[0] + (codes.astype(np.float32) + 128.5) * steps).astype(np.float32)


def code_hashes(int8_codes: np.ndarray, binary_codes: np.ndarray) -> np.ndarray:
    """uint64 (n,) hash of each row's codes: the rows' bytes folded 8 at a time with a distinct odd multiplier
    per position (wrapping arithmetic). Equal codes give equal hashes on every machine."""
    rows = np.concatenate([int8_codes.view(np.uint8), binary_codes.view(np.uint8)], axis=1)
    pad = (-rows.shape[1]) % 8
    if pad:
        rows = np.pad(rows, ((0, 0), (0, pad)))
    words = np.ascontiguousarray(rows).view("<u8")
    multipliers = (np.arange(words.shape[1], dtype=np.uint64) * np.uint64(2) + np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (words * multipliers).sum(axis=1, dtype=np.uint64) ^ np.uint64(words.shape[1])


def new_index(layout: str, dim: int, nlist: int, ranges: np.ndarray) -> faiss.Index | faiss.IndexBinary:
    """An empty index of ``layout``: flat with ids when ``nlist`` is 0, else IVF with an untrained coarse quantizer.

    For ``int8`` the scalar quantizer is fixed to ``ranges`` (never trained on the data), and codes are
    not residuals, so the index stores the stored int8 codes + 128 exactly.
    """
    if layout == "int8":
        if nlist == 0:
            flat = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            _fix_ranges(flat.sq, ranges)
            flat.is_trained = True
            return faiss.IndexIDMap2(flat)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
        )
        index.by_residual = False
        _fix_ranges(index.sq, ranges)
        return index
    if layout == "binary":
        if dim % 8:
            raise ValueError(f"the binary layout needs a dimension divisible by 8, got {dim}")
        if nlist == 0:
            return faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(dim))
        return faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(dim), dim, nlist)
    raise ValueError(f"unknown index layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def _fix_ranges(sq: faiss.ScalarQuantizer, ranges: np.ndarray) -> None:
    trained = np.concatenate([ranges[0], ranges[1] - ranges[0]]).astype(np.float32)
    faiss.copy_array_to_vector(trained, sq.trained)


def train(index, layout: str, int8_sample: np.ndarray, binary_sample: np.ndarray, ranges: np.ndarray, seed: int = 0) -> None:
    """Train the coarse quantizer of an IVF index on a sample of codes (no-op for a flat index).

    ``int8``: spherical k-means on the decoded int8 codes (the scalar quantizer keeps its fixed ranges);
    ``binary``: FAISS' binary k-means on the packed codes.
    """
    if index.is_trained:
        return
    if layout == "int8":
        floats = dequantize(int8_sample, ranges)
        faiss.normalize_L2(floats)
        kmeans = faiss.Kmeans(index.d, index.nlist, niter=20, seed=seed + 1234, spherical=True, verbose=False)
        kmeans.train(floats)
        index.quantizer.add(kmeans.centroids)
        index.is_trained = True
    else:
        index.cp.seed = seed + 1234
        index.train(np.ascontiguousarray(binary_sample, dtype=np.uint8))


def add(index, layout: str, ids: np.ndarray, int8_codes: np.ndarray, binary_codes: np.ndarray, ranges: np.ndarray) -> None:
    """Add one batch of codes under int64 vector ids."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if layout == "int8":
        index.add_with_ids(dequantize(int8_codes, ranges), ids)
    else:
        index.add_with_ids(np.ascontiguousarray(binary_codes, dtype=np.uint8), ids)


def remove(index, ids: np.ndarray) -> int:
    """Remove vectors by id; returns how many were removed."""
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    return int(index.remove_ids(faiss.IDSelectorBatch(ids))) if ids.size else 0


def nlist_of(index) -> int:
    """Inverted lists of an IVF index (float or binary); 0 for a flat one."""
    ivf = _binary_ivf(index) if isinstance(index, faiss.IndexBinary) else faiss.try_extract_index_ivf(index)
    return 0 if ivf is None else int(ivf.nlist)


def _binary_ivf(index) -> faiss.IndexBinaryIVF | None:
    """The IndexBinaryIVF inside ``index`` (FAISS has no extract helper for binary indexes), or None."""
    index = faiss.downcast_IndexBinary(index)
    return index if isinstance(index, faiss.IndexBinaryIVF) else None


def centroid_fit(index, layout: str, int8_codes: np.ndarray, binary_codes: np.ndarray, ranges: np.ndarray) -> float | None:
    """How well codes fit the trained coarse quantizer, as a similarity in [-1, 1]; None for a flat index.

    ``int8``: mean inner product of the decoded vectors to their nearest centroid; ``binary``: 1 - 2 x the
    mean Hamming distance to the nearest centroid / dim (the cosine of sign vectors). Compared with the
    value of the training sample it tells whether new data drifted away from the quantizer.
    """
    if nlist_of(index) == 0 or len(int8_codes) == 0:
        return None
    if layout == "int8":
        floats = dequantize(int8_codes, ranges)
        faiss.normalize_L2(floats)
        similarity, _ = index.quantizer.search(floats, 1)
        return float(np.mean(similarity))
    quantizer = faiss.downcast_IndexBinary(_binary_ivf(index).quantizer)
    distance, _ = quantizer.search(np.ascontiguousarray(binary_codes, dtype=np.uint8), 1)
    return float(1.0 - 2.0 * np.mean(distance) / index.d)


def write_index(index, path: Path) -> None:
    if isinstance(index, faiss.IndexBinary):
        faiss.write_index_binary(index, str(path))
    else:
        faiss.write_index(index, str(path))


def read_index(path: Path, layout: str):
    return faiss.read_index_binary(str(path)) if layout == "binary" else faiss.read_index(str(path))


def lexical_text(title: str | None, heading_path_json: str | None, text: str) -> str:
    """What the lexical index reads of a row: its document title, heading path and text."""
    headings = " ".join(json.loads(heading_path_json or "[]"))
    return " ".join(part for part in (title or "", headings, text) if part)


def build_lexical(folder: Path, texts_batches) -> int:
    """Write a BM25 index of the rows' texts (batches of strings in row order) into ``folder/bm25``.

    Returns the vocabulary size. Tokens are lower-cased words of 2+ characters, English stopwords removed.
    """
    import bm25s
    from bm25s.tokenization import Tokenizer

    tokenizer = Tokenizer(stopwords=LEXICAL_STOPWORDS)
    ids: list[list[int]] = []
    for texts in texts_batches:
        ids.extend(tokenizer.tokenize(list(texts), return_as="ids", update_vocab=True, show_progress=False))
    retriever = bm25s.BM25()
    retriever.index(ids, show_progress=False)
    target = folder / LEXICAL_DIR
    target.mkdir()
    retriever.save(str(target), show_progress=False)
    tokenizer.save_vocab(str(target))
    return len(tokenizer.get_vocab_dict())


def version_files(folder: Path) -> list[Path]:
    """Every file of a version folder (the lexical index's included), manifest excluded, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as recorded in the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Hit:
    """One search result: the vector id, its row in the version's files, and the score (inner product)."""

    vector_id: int
    row: int
    score: float


class IndexVersion:
    """An opened, read-only version: search it, read the chunks of its hits. Safe to share between threads
    for searching once :meth:`set_search_params` is no longer called."""

    def __init__(self, path: Path, manifest: dict[str, Any], index, ids: np.ndarray, ranges: np.ndarray,
                 int8: Int8Rows | None, chunks: pa.Table):
        self.path = path
        self.manifest = manifest
        self.layout: str = manifest["layout"]
        self.index = index
        self.ids = ids
        self.ranges = ranges
        self.int8 = int8
        self.chunks = chunks
        self.nprobe = int(manifest.get("nprobe") or 0)
        self.rescore_multiplier = int(manifest.get("rescore_multiplier") or 1)
        self._lexical = None
        self._lexical_lock = threading.Lock()
        self._apply_nprobe()

    @property
    def has_lexical(self) -> bool:
        return bool(self.manifest.get("lexical")) and (self.path / LEXICAL_DIR).is_dir()

    def lexical_search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 top-k ``(scores (k',), rows (k',))`` for a query text, best first (k' <= k: rows that share
        no word with the query are left out). Raises IndexVersionError when the version has no lexical index."""
        if not self.has_lexical:
            raise IndexVersionError(f"index version {self.path} has no lexical index (built with EMBEDDING_LEXICAL_INDEX=0)")
        retriever, tokenizer = self._load_lexical()
        ids = tokenizer.tokenize([query], return_as="ids", update_vocab=False, show_progress=False)
        if not ids or not ids[0]:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        k = max(1, min(int(k), self.count))
        rows, scores = retriever.retrieve(ids, k=k, show_progress=False, n_threads=1)
        rows, scores = np.asarray(rows[0], dtype=np.int64), np.asarray(scores[0], dtype=np.float32)
        keep = scores > 0
        return scores[keep], rows[keep]

    def _load_lexical(self):
        with self._lexical_lock:
            if self._lexical is None:
                import bm25s
                from bm25s.tokenization import Tokenizer

                folder = str(self.path / LEXICAL_DIR)
                retriever = bm25s.BM25.load(folder, mmap=True, show_progress=False)
                tokenizer = Tokenizer(stopwords=LEXICAL_STOPWORDS)
                tokenizer.load_vocab(folder)
                self._lexical = (retriever, tokenizer)
            return self._lexical

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", self.path.name))

    @property
    def count(self) -> int:
        return int(len(self.ids))

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any] | None = None, *, verify: str = "sizes") -> IndexVersion:
        """Open the version in ``path``. ``verify``: ``"sizes"`` (every file present with its recorded size)
        or ``"full"`` (sha256 of every file too). Raises IndexVersionError naming the folder and the problem."""
        path = Path(path)
        try:
            if manifest is None:
                manifest = json.loads((path / MANIFEST_FILE).read_text())
            if manifest.get("format") != FORMAT:
                raise IndexVersionError(f"index version {path} has format {manifest.get('format')}, this reader knows {FORMAT}")
            layout = manifest["layout"]
            missing = [name for name in files_of(layout) if name not in manifest["files"]]
            if missing:
                raise IndexVersionError(f"index version {path}: the manifest does not list {', '.join(missing)}")
            for name, recorded in manifest["files"].items():
                file = path / name
                if not file.is_file():
                    raise IndexVersionError(f"index version {path} is missing {name}")
                if file.stat().st_size != recorded["bytes"]:
                    raise IndexVersionError(f"index version {path}: {name} has {file.stat().st_size} bytes, "
                                            f"the manifest says {recorded['bytes']} (truncated or overwritten)")
                if verify == "full" and file_digest(file)["sha256"] != recorded["sha256"]:
                    raise IndexVersionError(f"index version {path}: {name} does not match its sha256 (damaged)")
            index = read_index(path / INDEX_FILE[layout], layout)
            ids = np.load(path / IDS_FILE, mmap_mode="r")
            ranges = np.load(path / RANGES_FILE)
            int8 = Int8Rows(path / INT8_FILE) if layout == "binary" else None
            chunks = pa.ipc.open_file(pa.memory_map(str(path / CHUNKS_FILE), "r")).read_all()
        except IndexVersionError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, pa.ArrowException) as exc:
            raise IndexVersionError(f"index version {path} cannot be read: {type(exc).__name__}: {exc}") from exc
        n = int(manifest["count"])
        if not (len(ids) == chunks.num_rows == int(index.ntotal) == n) or (int8 is not None and len(int8) != n):
            raise IndexVersionError(
                f"index version {path} is inconsistent: manifest count {n}, ids {len(ids)}, chunks {chunks.num_rows}, "
                f"index {index.ntotal}" + ("" if int8 is None else f", int8 rows {len(int8)}")
            )
        return cls(path, manifest, index, ids, ranges, int8, chunks)

    def set_search_params(self, *, nprobe: int | None = None, rescore_multiplier: int | None = None) -> None:
        if nprobe is not None:
            self.nprobe = int(nprobe)
            self._apply_nprobe()
        if rescore_multiplier is not None:
            self.rescore_multiplier = max(1, int(rescore_multiplier))

    def _apply_nprobe(self) -> None:
        nlist = nlist_of(self.index)
        if nlist == 0:
            return
        nprobe = min(max(self.nprobe, 1), nlist)
        if self.layout == "binary":
            _binary_ivf(self.index).nprobe = nprobe
        else:
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ``(scores (nq, k) float32, vector ids (nq, k) int64)`` for float32 queries (nq, dim), best first.

        Scores are inner products with the decoded int8 codes (cosine similarity for unit queries).
        Missing results are padded with id -1 and score -inf.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise ValueError(f"queries must have shape (n, {self.index.d}), got {queries.shape}")
        k = max(1, int(k))
        if self.layout == "int8":
            scores, ids = self.index.search(queries, k)
            return scores, np.where(ids < 0, -1, ids)
        return self._binary_search(queries, k)

    def _binary_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        bits = np.packbits(queries > 0, axis=1)
        candidates = min(self.count, k * self.rescore_multiplier) or 1
        _, found = self.index.search(bits, candidates)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        for q, row_ids in enumerate(found):
            row_ids = row_ids[row_ids >= 0]
            if not len(row_ids):
                continue
            rows = self.rows_of(row_ids)
            vectors = dequantize(self.int8.read(rows), self.ranges)
            scores = vectors @ queries[q]
            order = np.lexsort((row_ids, -scores))[:k]
            out_scores[q, : len(order)] = scores[order]
            out_ids[q, : len(order)] = row_ids[order]
        return out_scores, out_ids

    def rows_of(self, vector_ids: Iterable[int]) -> np.ndarray:
        """Rows (positions in ids.npy, int8.npy, chunks.arrow) of vector ids that are in this version."""
        vector_ids = np.asarray(list(vector_ids) if not isinstance(vector_ids, np.ndarray) else vector_ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, vector_ids)
        rows = np.minimum(rows, max(self.count - 1, 0))
        if self.count == 0 or not np.array_equal(np.asarray(self.ids[rows]), vector_ids):
            raise KeyError("vector ids not in this index version")
        return rows

    def chunk_rows(self, rows: Iterable[int]) -> list[dict[str, Any]]:
        """The chunk map rows (dicts of CHUNK_SCHEMA's columns, heading_path parsed) at ``rows``."""
        rows = list(rows)
        if not rows:
            return []
        table = self.chunks.take(pa.array(rows, type=pa.int64()))
        out = table.to_pylist()
        for row in out:
            row["heading_path"] = json.loads(row.get("heading_path") or "[]")
        return out


class Int8Rows:
    """Rows of an (n, dim) int8 ``.npy`` file read on demand with ``os.pread``: only the rows asked for are
    read, into the OS page cache rather than the process's memory (a memory map would count every touched
    page as the process's resident memory)."""

    _MERGE_GAP_ROWS = 16

    def __init__(self, path: Path):
        with open(path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            self._offset = fh.tell()
        if dtype != np.int8 or fortran or len(shape) != 2:
            raise ValueError(f"{path} is not a C-ordered 2-D int8 array")
        self._n, self._dim = shape
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self._n

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The int8 rows (len(rows), dim) at ``rows`` (any order, repeats allowed). Rows at most
        ``_MERGE_GAP_ROWS`` apart are read in one ``pread``: a system call costs about as much as copying a
        few KB, and a few hundred candidates of a small index lie close together."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self._dim), dtype=np.int8)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        bounds = [0, *(np.flatnonzero(np.diff(ordered) > self._MERGE_GAP_ROWS) + 1).tolist(), len(ordered)]
        for start, end in itertools.pairwise(bounds):
            first, last = int(ordered[start]), int(ordered[end - 1])
            size = (last - first + 1) * self._dim
            data = os.pread(self._fd, size, self._offset + first * self._dim)
            if len(data) != size:
                raise IndexVersionError(f"int8 rows {first}-{last} are cut short ({len(data)} of {size} bytes)")
            block = np.frombuffer(data, dtype=np.int8).reshape(-1, self._dim)
            out[order[start:end]] = block[ordered[start:end] - first]
        return out

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def estimate_cost(layout: str, n: int, nlist: int, nprobe: int, k: int, rescore_multiplier: int) -> float:
    """A deterministic relative cost of one query, used to choose among settings that all meet the recall
    target: codes scanned (IVF lists visited) plus, for ``binary``, candidates rescored (an int8 decode
    and dot product costs about as much as scanning 16 binary codes)."""
    scanned = n if nlist == 0 else math.ceil(n * min(nprobe, nlist) / nlist) + nlist
    if layout == "int8":
        return float(scanned)
    return scanned / 8.0 + 16.0 * k * rescore_multiplier
