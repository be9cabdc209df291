"""Index layouts at scale (issue 9): float32 IVF against the ``int8`` and ``binary`` index versions.

    python -m benchmarks.index_memory [--n 1000000] [--queries 1000] [--results FILE]

N synthetic 384-d unit vectors (a mixture of anisotropic clusters, so IVF behaves as on sentence
embeddings) are built three ways, each by the code that builds it in the pipeline:

- ``float32 IVF``: the baseline, ``IVF{4 sqrt N},Flat`` on the float vectors, nprobe tuned the same way;
- ``int8`` and ``binary``: the stage's own builder (``stages.faiss_index._build``) over a snapshot file
  of the codes, tuned to recall@10 >= 0.95 (+ sampling margin) against exact float32 search.

Then, for each, a fresh process loads the version and answers the queries one at a time (queries drawn
from the same distribution, never in the corpus nor used for tuning) and reports its resident memory
(VmRSS), p50/p95 latency and recall@10 against exact float32 search. Bytes per vector on disk are the
version's files over N (the chunk text map excluded: it is the same for every layout). Ratios are
against float32 IVF measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384
K = 10


def synthetic(n: int, seed: int, shape: dict) -> np.ndarray:
    """Unit vectors shaped like all-MiniLM-L6-v2 chunk embeddings: a shared direction (mean vector norm
    ~0.49; real chunks of the Python docs: 0.47), topics and sub-topics of ~10 vectors each, small noise.
    Measured on 20k of them: cosine to the nearest neighbour 0.79 (real 0.80), to the 10th 0.66 (real 0.67),
    median pairwise cosine 0.24 (real 0.21)."""
    rng = np.random.default_rng(seed)
    sub = rng.integers(0, len(shape["sub"]), n)
    x = 0.5 * shape["shared"] + 0.45 * shape["topic"][sub // shape["per_topic"]] + 0.6 * shape["sub"][sub]
    x = x + 0.025 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _units(rng, rows: int) -> np.ndarray:
    x = rng.standard_normal((rows, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(folder: Path, n: int, queries: int) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    topics = max(4, n // 500)
    shape = {"shared": _units(rng, 1)[0], "topic": _units(rng, topics), "sub": _units(rng, topics * 50), "per_topic": 50}
    corpus = np.lib.format.open_memmap(folder / "corpus.npy", mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, 100_000):
        corpus[start: start + 100_000] = synthetic(min(100_000, n - start), 1 + start, shape)
    corpus.flush()
    return folder / "corpus.npy", synthetic(queries, 999_999_999, shape)


def write_snapshot(corpus: np.ndarray, path: Path) -> np.ndarray:
    """A snapshot file as the stage exports it, from numpy; returns the calibration ranges."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedding_assets.core.quantization import calibration_ranges, quantize_binary, quantize_int8

    ranges = calibration_ranges(corpus[:10_000])
    schema = pa.schema([("vector_id", pa.int64()), ("chunk_id", pa.string()), ("source", pa.string()),
                        ("doc_path", pa.string()), ("heading_path", pa.string()), ("title", pa.string()),
                        ("text", pa.string()), ("page", pa.int32()), ("token_count", pa.int32()), ("int8", pa.binary()),
                        ("ubinary", pa.binary()), ("vector", pa.list_(pa.float32()))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(corpus), 8192):
            block = np.asarray(corpus[start: start + 8192])
            ids = np.arange(start, start + len(block), dtype=np.int64)
            offsets = pa.array(np.arange(0, (len(block) + 1) * DIM, DIM, dtype=np.int32))
            writer.write_table(pa.table({
                "vector_id": ids, "chunk_id": [f"c{i}" for i in ids], "source": ["s"] * len(ids),
                "doc_path": ["d"] * len(ids), "heading_path": ["[]"] * len(ids), "title": [None] * len(ids),
                "text": ["t"] * len(ids), "page": pa.nulls(len(ids), pa.int32()), "token_count": np.ones(len(ids), dtype=np.int32),
                "int8": [r.tobytes() for r in quantize_int8(block, ranges)],
                "ubinary": [r.tobytes() for r in quantize_binary(block)],
                "vector": pa.ListArray.from_arrays(offsets, pa.array(block.reshape(-1))),
            }, schema=schema))
    return ranges


def build_layout(layout: str, snapshot: Path, ranges: np.ndarray, n: int, folder: Path) -> dict:
    from embedding_assets.stages.faiss_index import IndexReport, IndexSettings, Snapshot, _build

    out = folder / layout
    out.mkdir()
    started = time.perf_counter()
    report = IndexReport(layout=layout)
    manifest = _build(Snapshot(snapshot, n, {"count": n}, ranges, 0), None, out, report, "synthetic", DIM,
                      IndexSettings(layout=layout, lexical=False, tuning_queries="vectors"), lambda *a: None)
    from embedding_assets.core import index_version as iv

    manifest["files"] = {p.relative_to(out).as_posix(): iv.file_digest(p) for p in iv.version_files(out)}
    (out / iv.MANIFEST_FILE).write_text(json.dumps(manifest))
    return {"seconds_to_build": round(time.perf_counter() - started, 1), "nlist": manifest["nlist"],
            "nprobe": manifest["nprobe"], "rescore_multiplier": manifest["rescore_multiplier"],
            "tuning_recall": round(manifest["recall_at_k"], 4),
            "bytes_on_disk": sum(p.stat().st_size for p in out.iterdir() if p.name not in ("chunks.arrow", "manifest.json"))}


def build_float_ivf(corpus_path: Path, n: int, folder: Path) -> dict:
    import faiss

    from embedding_assets.core.ivf import choose_nlist, exact_top_k, sample_rows, tune_nprobe

    corpus = np.load(corpus_path, mmap_mode="r")
    started = time.perf_counter()
    nlist = choose_nlist(n)
    index = faiss.index_factory(DIM, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(np.asarray(corpus[sample_rows(n, min(n, 64 * nlist), seed=0)]))
    for start in range(0, n, 100_000):
        index.add_with_ids(np.asarray(corpus[start: start + 100_000]), np.arange(start, min(n, start + 100_000), dtype=np.int64))
    queries = np.asarray(corpus[sample_rows(n, 200, seed=1)])
    truth = exact_top_k(queries, ((np.arange(s, min(n, s + 100_000)), np.asarray(corpus[s: s + 100_000])) for s in range(0, n, 100_000)), K)
    nprobe, recall = tune_nprobe(index, queries, truth, k=K, target_recall=0.95)
    out = folder / "float32"
    out.mkdir()
    faiss.write_index(index, str(out / "index.faiss"))
    (out / "nprobe").write_text(str(nprobe))
    return {"seconds_to_build": round(time.perf_counter() - started, 1), "nlist": nlist, "nprobe": nprobe,
            "rescore_multiplier": 1, "tuning_recall": round(recall, 4), "bytes_on_disk": (out / "index.faiss").stat().st_size}


_QUERY_PROCESS = r"""
import json, sys, time, numpy as np
layout, folder, queries_path, truth_path = sys.argv[1:5]
sys.path.insert(0, sys.argv[5])
from embedding_assets.core.ivf import recall_at_k
queries = np.load(queries_path); truth = np.load(truth_path)
if layout == "float32":
    import faiss
    index = faiss.read_index(folder + "/index.faiss")
    faiss.extract_index_ivf(index).nprobe = int(open(folder + "/nprobe").read())
    search = lambda q: index.search(q, 10)[1]
else:
    from pathlib import Path
    from embedding_assets.core.index_version import IndexVersion
    version = IndexVersion.open(Path(folder))
    search = lambda q: version.search(q, 10)[1]
import faiss
faiss.omp_set_num_threads(1)
latencies, found = [], []
for q in queries:
    t = time.perf_counter(); found.append(search(q[None, :])[0]); latencies.append(time.perf_counter() - t)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
print(json.dumps({"rss_bytes": rss, "p50_ms": float(np.percentile(latencies, 50) * 1e3),
                  "p95_ms": float(np.percentile(latencies, 95) * 1e3), "recall_at_10": recall_at_k(np.array(found), truth, 10)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=None, help="also write the JSON results here")
    args = parser.parse_args(argv)
    repo = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, repo)
    from embedding_assets.core.ivf import exact_top_k

    with tempfile.TemporaryDirectory(prefix="index-memory-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        corpus_path, queries = make_data(folder, args.n, args.queries)
        corpus = np.load(corpus_path, mmap_mode="r")
        truth = exact_top_k(queries, ((np.arange(s, min(args.n, s + 100_000)), np.asarray(corpus[s: s + 100_000]))
                                      for s in range(0, args.n, 100_000)), K)
        np.save(folder / "queries.npy", queries)
        np.save(folder / "truth.npy", truth)
        print(f"data and exact truth: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        ranges = write_snapshot(corpus, folder / "snapshot.parquet")
        results = {"float32": build_float_ivf(corpus_path, args.n, folder)}
        print(f"float32 IVF built: {results['float32']}", file=sys.stderr)
        for layout in ("int8", "binary"):
            results[layout] = build_layout(layout, folder / "snapshot.parquet", ranges, args.n, folder)
            print(f"{layout} built: {results[layout]}", file=sys.stderr)
        for layout in results:
            done = subprocess.run([sys.executable, "-c", _QUERY_PROCESS, layout, str(folder / layout),
                                   str(folder / "queries.npy"), str(folder / "truth.npy"), repo],
                                  capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            results[layout].update(json.loads(done.stdout.strip().splitlines()[-1]))
    base = results["float32"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; N = {args.n:,}, "
          f"{args.queries} queries one at a time (1 thread), recall@10 vs exact float32")
    print(f"{'layout':<9}{'bytes/vec disk':>15}{'RSS MB':>9}{'RSS ratio':>10}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'recall@10':>10}{'nlist':>7}{'nprobe':>7}{'rescore':>8}")
    for layout, r in results.items():
        print(f"{layout:<9}{r['bytes_on_disk'] / args.n:>15.1f}{r['rss_bytes'] / 2**20:>9.0f}"
              f"{r['rss_bytes'] / base['rss_bytes']:>10.3f}{r['p50_ms']:>8.2f}{r['p95_ms']:>8.2f}"
              f"{r['recall_at_10']:>10.4f}{r['nlist']:>7}{r['nprobe']:>7}{r['rescore_multiplier']:>8}")
    if args.results:
        args.results.write_text(json.dumps({"n": args.n, "queries": args.queries, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
