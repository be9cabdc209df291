"""Performance benchmark (issue 5): our pipeline against the hand-written baseline, in one invocation.

    python -m benchmarks.run [--quick] [--corpus DIR] [--results FILE]

Corpus: Debian's python3.11-doc HTML (``apt-get install python3.11-doc``). Every figure is a ratio
against the baseline (``benchmarks/baseline.py``) measured in the same invocation, interleaved, so a
busy machine slows both sides alike. Sections:

1. encode: chunks/s of ``SentenceTransformer.encode(batch_size=64)`` fp32 vs each precision path of
   ``EmbeddingModelResource`` on the same ~243-token chunks, with mean cosine and recall@10 vs fp32;
   token-budget sweep with padding waste.
2. pipeline: raw HTML -> published index, each side in its own subprocess (imports and model load
   included), wall-time ratio; padding waste of the real pipeline's chunks before/after batching.
3. memory: peak RSS of our full run on a corpus N and 4N (subprocesses).
4. search: p50/p95/p99 single-query latency, batch-of-100 throughput and recall@10 vs exact float32
   for Flat, IVF-Flat, IVF-SQ8 and binary + int8 rescoring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import baseline

DEFAULT_CORPUS = Path("/usr/share/doc/python3.11/html")
SOURCE = "pydocs"
K = 10


# ---- corpus ----------------------------------------------------------------------------------------

def corpus_pages(root: Path) -> list[Path]:
    """Every documentation page (not Sphinx's _static/_sources copies), in a fixed shuffled order.

    Shuffled with a fixed seed so a byte-size prefix samples every part of the docs, not one folder.
    """
    if not root.is_dir():
        raise SystemExit(f"corpus {root} not found: apt-get install python3.11-doc (or pass --corpus DIR)")
    pages = sorted(p for p in root.rglob("*.html") if p.is_file() and not any(part.startswith("_") for part in p.relative_to(root).parts))
    random.Random(0).shuffle(pages)
    return pages


def page_prefix(pages: list[Path], max_bytes: int | None) -> list[Path]:
    """The shortest prefix of ``pages`` holding at least ``max_bytes`` of HTML (all pages for None)."""
    if max_bytes is None:
        return list(pages)
    total, chosen = 0, []
    for page in pages:
        chosen.append(page)
        total += page.stat().st_size
        if total >= max_bytes:
            break
    return chosen


def copy_corpus(root: Path, pages: list[Path], dest: Path) -> Path:
    """Copy pages (keeping relative paths) into ``dest/SOURCE``; returns the sources root ``dest``."""
    for page in pages:
        target = dest / SOURCE / page.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page, target)
    return dest


# ---- children: one full run per process, so RSS and wall time are the run's own ------------------

def child_baseline(sources: Path, work: Path) -> dict:
    return baseline.run(sources / SOURCE, work / "baseline_index")


def child_ours(sources: Path, work: Path) -> dict:
    import dagster as dg

    from embedding_assets.definitions import build_definitions
    from embedding_assets.runner import materialize_index, materialize_source
    from resources import (
        DocumentSourcesResource,
        EmbeddingCacheResource,
        EmbeddingModelResource,
        IndexStoreResource,
        WarehouseResource,
    )

    home = work / "home"
    model = EmbeddingModelResource()
    resources = {
        "sources": DocumentSourcesResource(root=str(sources)),
        "warehouse": WarehouseResource(home=str(home)),
        "index_store": IndexStoreResource(home=str(home)),
        "model": model,
        "cache": EmbeddingCacheResource(home=str(home), redis_url=None),
    }
    started = time.perf_counter()
    with dg.instance_for_test() as instance:
        defs = build_definitions(resources)
        source_meta = materialize_source(defs, instance, SOURCE)
        index_meta = materialize_index(defs, instance)
    seconds = time.perf_counter() - started
    counts = resources["warehouse"].query_rows(
        """SELECT k.token_count FROM chunks k JOIN chunk_dedup x USING (chunk_id)
           WHERE x.status = 'canonical' ORDER BY k.chunk_id"""
    )
    lengths = np.minimum(np.asarray([c[0] for c in counts], dtype=np.int64) + 2, model.effective_max_seq_length())
    return {
        "chunks": int(len(lengths)),
        "mean_tokens": float(lengths.mean()) if len(lengths) else 0.0,
        "dtype": model.resolved_dtype(),
        "seconds": {"pipeline": seconds},
        "padding_waste": {
            "fixed64_input_order": padding_waste(lengths, fixed_batches(len(lengths), 64)),
            "fixed64_length_sorted": padding_waste(lengths, fixed_batches(len(lengths), 64, lengths)),
            "token_budget": padding_waste(lengths, plan(lengths, model)),
        },
        "metadata": {asset: {k: _plain(v) for k, v in meta.items()} for asset, meta in source_meta.items()}
        | {"faiss_index": {k: _plain(v) for k, v in index_meta.items()}},
    }


def reset_peak_rss() -> None:
    """Forget the peak RSS inherited from the parent.

    A forked child starts with its parent's high-water mark (and execve keeps it), so without this
    every child would report the parent's peak (the parent holds the encode benchmark's models).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) since :func:`reset_peak_rss`, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plain(value):
    value = getattr(value, "value", value)
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def run_child(kind: str, sources: Path, work: Path) -> dict:
    """Run one side in a fresh interpreter; wall time includes imports and model load."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--child", kind, "--sources", str(sources), "--work", str(work)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_seconds"] = wall
    return result


# ---- batching ---------------------------------------------------------------------------------------

def fixed_batches(n: int, size: int, lengths: np.ndarray | None = None) -> list[np.ndarray]:
    order = np.arange(n) if lengths is None else np.argsort(-lengths, kind="stable")
    return [order[i : i + size] for i in range(0, n, size)]


def plan(lengths: np.ndarray, model) -> list[np.ndarray]:
    from resources.model import plan_batches

    return plan_batches(lengths, model.resolved_token_budget(), model.resolved_batch_size())


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return 0.0 if not padded else 1.0 - float(lengths.sum()) / padded


# ---- 1. encode -------------------------------------------------------------------------------------

SETTLE_SECONDS = 1.0


def interleaved_rounds(paths: dict, chunks: list[str], rounds: int) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Each path encodes ``chunks`` once per round, paths interleaved so machine load hits every path
    alike; returns ({path: chunks/s per round}, {path: last vectors}). One warm-up call each first.

    Every timed pass starts after an untimed pause of ``SETTLE_SECONDS``. The previous path's worker threads
    keep spinning for a while after a pass (torch's OpenMP pool), which took CPU from the next path:
    int8 measured 61.9 chunks/s right after torch passes and 78.2 after a 1 s pause, the baseline
    28.1 and 26.1 (a one-off on 128 windows, median of 3 rounds)."""
    for fn in paths.values():
        fn(chunks[:8])  # warm-up: load, first-call allocations
    speeds: dict[str, list[float]] = {name: [] for name in paths}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for name, fn in paths.items():
            time.sleep(SETTLE_SECONDS)
            started = time.perf_counter()
            vectors[name] = np.asarray(fn(chunks), dtype=np.float32)
            speeds[name].append(len(chunks) / (time.perf_counter() - started))
    return speeds, vectors


def int8_dtype() -> list[str]:
    """["int8"] where it can run (the `int8` extra installed, a CPU with VNNI or AMX), else []."""
    from resources import int8

    return [] if int8.unavailable_reason() or not int8.cpu_int8_instructions() else ["int8"]


def encode_bench(chunks: list[str], rounds: int, dtypes: list[str], budgets: list[int], threads: list[int]) -> dict:
    import torch

    from resources.model import EmbeddingModelResource

    st = baseline.load_model()
    tokenizer = st.tokenizer
    lengths = np.asarray([len(ids) for ids in tokenizer(chunks, truncation=True, max_length=256)["input_ids"]])
    paths = {"baseline encode(64) fp32": lambda texts: baseline.encode(st, texts)}
    for dtype in dtypes:  # at the baseline's input (the model's own 256): both embed the same tokens
        model = EmbeddingModelResource(max_seq_length=None, dtype=dtype)
        paths[f"ours {dtype}"] = (lambda m: lambda texts: m.encode(texts)[0])(model)
    if "bfloat16" in dtypes:  # what the CPU streams add: the same dtype on one stream with every thread
        model = EmbeddingModelResource(max_seq_length=None, dtype="bfloat16", cpu_streams=1)
        paths["ours bfloat16, 1 stream"] = (lambda m: lambda texts: m.encode(texts)[0])(model)
    speeds, vectors = interleaved_rounds(paths, chunks, rounds)
    reference = vectors["baseline encode(64) fp32"]
    truth = exact_ids(reference, reference)
    base = statistics.median(speeds["baseline encode(64) fp32"])
    rows = []
    for name in paths:
        v = vectors[name]
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        rows.append({
            "path": name,
            "chunks_per_s": statistics.median(speeds[name]),
            "ratio": statistics.median(speeds[name]) / base,
            "mean_cosine": float((v * reference).sum(1).mean()),
            "min_cosine": float((v * reference).sum(1).min()),
            "recall_at_10": recall(exact_ids(v, v), truth),
        })
    best = max((r for r in rows if r["path"] in {f"ours {d}" for d in dtypes} and r["mean_cosine"] >= 0.995), key=lambda r: r["ratio"])
    best_dtype = best["path"].removeprefix("ours ")
    sweep = []
    for budget in budgets:
        model = EmbeddingModelResource(max_seq_length=None, dtype=best_dtype, token_budget=budget, batch_size=1024)
        model.encode(chunks[:8])
        time.sleep(SETTLE_SECONDS)
        started = time.perf_counter()
        _, stats = model.encode(chunks)
        sweep.append({"token_budget": budget, "chunks_per_s": len(chunks) / (time.perf_counter() - started),
                      "batches": stats.batches, "padding_waste": stats.padding_waste})
    time.sleep(SETTLE_SECONDS)
    started = time.perf_counter()
    baseline.encode(st, chunks)
    sweep_base = len(chunks) / (time.perf_counter() - started)
    for row in sweep:
        row["ratio"] = row["chunks_per_s"] / sweep_base
    thread_rows = []
    default_threads = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        streams = 1 if best_dtype == "int8" else min(n, 2)  # OpenVINO spreads one batch over the n threads itself
        model = EmbeddingModelResource(max_seq_length=None, dtype=best_dtype, cpu_threads=n, cpu_streams=streams)  # n cores in all
        row = {"threads": n}
        for name, fn in (("baseline", paths["baseline encode(64) fp32"]), ("ours", lambda t: model.encode(t)[0])):
            time.sleep(SETTLE_SECONDS)
            started = time.perf_counter()
            fn(chunks)
            row[name] = len(chunks) / (time.perf_counter() - started)
        row["ratio"] = row["ours"] / row["baseline"]
        thread_rows.append(row)
    torch.set_num_threads(default_threads)
    return {
        "chunks": len(chunks), "mean_tokens": float(lengths.mean()), "rounds": rounds, "threads": default_threads,
        "rows": rows, "best": best_dtype, "budget_sweep": sweep, "thread_sweep": thread_rows,
        "padding_waste_fixed64_input_order": padding_waste(lengths, fixed_batches(len(lengths), 64)),
    }


def exact_ids(queries: np.ndarray, corpus: np.ndarray, k: int = K) -> np.ndarray:
    scores = queries @ corpus.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    from embedding_assets.core.ivf import recall_at_k

    return recall_at_k(found, truth, min(K, found.shape[1]))


# ---- 4. search ------------------------------------------------------------------------------------

def search_bench(real: np.ndarray, min_vectors: int, seed: int = 0) -> dict:
    """Index options on the real vectors, topped up with noisy copies of them to ``min_vectors``."""
    import faiss

    from embedding_assets.core import ivf, quantization

    rng = np.random.default_rng(seed)
    dim = real.shape[1]
    noise = 0.6 / np.sqrt(dim)  # a noisy copy has cosine ~0.85 to its original: near, not a duplicate

    def noisy(rows: np.ndarray) -> np.ndarray:
        v = rows + rng.normal(0, noise, rows.shape).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    synthetic = max(0, min_vectors - len(real))
    # Synthetic rows mix two real vectors (random weight) plus noise, so they spread between the real
    # ones instead of piling up on a few originals.
    weight = rng.uniform(0.0, 1.0, (synthetic, 1)).astype(np.float32)
    mixed = weight * real[rng.integers(len(real), size=synthetic)] + (1 - weight) * real[rng.integers(len(real), size=synthetic)]
    mixed /= np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-6)
    corpus = np.ascontiguousarray(np.vstack([real, noisy(mixed)]).astype(np.float32))
    ids = np.arange(len(corpus), dtype=np.int64)
    queries = noisy(real[rng.integers(len(real), size=300)])
    tune_q, test_q = queries[:100], queries[100:]
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    truth_tune = flat.search(tune_q, K)[1]
    truth_test = flat.search(test_q, K)[1]

    options: dict[str, object] = {"Flat": flat}
    for name, template in (("IVF-Flat (default)", "IVF{nlist},Flat"), ("IVF-SQ8", "IVF{nlist},SQ8")):
        factory = ivf.factory_string(len(corpus), template)
        index = ivf.build_index(factory, dim, corpus)
        ivf.add_vectors(index, ids, corpus)
        nprobe, _ = ivf.tune_nprobe(index, tune_q, truth_tune, k=K, target_recall=0.95)
        options[f"{name} {factory} nprobe={nprobe}"] = index
    ranges = quantization.calibration_ranges(corpus[ivf.sample_rows(len(corpus), min(len(corpus), 10_000))])
    codes = quantization.quantize_int8(corpus, ranges)
    binary = faiss.IndexBinaryFlat(dim)
    binary.add(quantization.quantize_binary(corpus))

    def binary_int8(q: np.ndarray, k: int):
        _, candidates = binary.search(quantization.quantize_binary(q), k * 4)  # rescore multiplier 4
        centres = quantization.dequantize_int8(codes[candidates.ravel()], ranges).reshape(*candidates.shape, dim)
        scores = np.einsum("qd,qcd->qc", q, centres)
        order = np.argsort(-scores, axis=1)[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)

    options["binary + int8 rescore (x4)"] = binary_int8
    rows = []
    threads = faiss.omp_get_max_threads()
    for name, index in options.items():
        search = index if callable(index) else index.search
        latencies = []
        # One query at a time gains nothing from OpenMP, and on a busy machine its spinning threads
        # cost milliseconds: single queries run on one thread, batches on all.
        faiss.omp_set_num_threads(1)
        for q in test_q:
            started = time.perf_counter()
            search(q[None, :], K)
            latencies.append((time.perf_counter() - started) * 1000)
        faiss.omp_set_num_threads(threads)
        found = search(test_q, K)[1]
        started = time.perf_counter()
        for start in range(0, len(test_q), 100):
            search(test_q[start : start + 100], K)
        qps = len(test_q) / (time.perf_counter() - started)
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        rows.append({"index": name, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "batch100_qps": qps,
                     "recall_at_10": recall(found, truth_test)})
    return {"vectors": len(corpus), "real": len(real), "synthetic": synthetic, "queries": len(test_q), "rows": rows}


# ---- report --------------------------------------------------------------------------------------

def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    except OSError:
        model, flags = platform.processor(), ""
    notable = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "amx_int8", "avx512_fp16") if f in flags.split()]
    return f"{model}, {os.cpu_count()} CPUs, {' '.join(notable)}; Python {platform.python_version()}"


def markdown(results: dict) -> str:
    out = [f"# Benchmark results ({results['mode']})", "",
           f"- date: {results['date']}", f"- command: `{results['command']}`", f"- machine: {results['machine']}",
           f"- versions: {results['versions']}", f"- benchmark wall time: {results['total_seconds']:.0f} s; 1-minute load average "
           f"{results['load_before']:.1f} at start, {results['load_after']:.1f} at end (other work shares the CPUs)",
           f"- corpus: {results['corpus']}", ""]
    e = results["encode"]
    out += [f"## 1. Encode throughput ({e['chunks']} chunks, mean {e['mean_tokens']:.0f} tokens, median of {e['rounds']} interleaved rounds, torch threads {e['threads']})", "",
            "| path | chunks/s | ratio vs baseline | mean cos vs fp32 | min cos | recall@10 vs fp32 |", "|---|---|---|---|---|---|"]
    for r in e["rows"]:
        out.append(f"| {r['path']} | {r['chunks_per_s']:.1f} | {r['ratio']:.2f}x | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {r['recall_at_10']:.3f} |")
    out += ["", f"Token-budget sweep ({e['best']}; one pass each, ratio vs one baseline pass right after); "
            f"padding waste of fixed batches of 64 in input order: {e['padding_waste_fixed64_input_order']:.1%}", "",
            "| token budget | batches | padding waste | chunks/s | ratio |", "|---|---|---|---|---|"]
    for r in e["budget_sweep"]:
        out.append(f"| {r['token_budget']} | {r['batches']} | {r['padding_waste']:.1%} | {r['chunks_per_s']:.1f} | {r['ratio']:.2f}x |")
    if e["thread_sweep"]:
        out += ["", "| cores (baseline: torch threads; ours: streams x threads) | baseline chunks/s | ours chunks/s | ratio |", "|---|---|---|---|"]
        for r in e["thread_sweep"]:
            out.append(f"| {r['threads']} | {r['baseline']:.1f} | {r['ours']:.1f} | {r['ratio']:.2f}x |")
    p = results["pipeline"]
    b, o = p["baseline"], p["ours"]
    stage_seconds = ", ".join(f"{a} {m.get('seconds', '?')}" for a, m in o["metadata"].items())
    out += ["", f"## 2. Whole pipeline, raw HTML -> published index ({p['pages']} pages, {p['html_mb']:.1f} MB HTML)", "",
            "| side | chunks | wall s (process) | work s (after imports) | peak RSS MB |", "|---|---|---|---|---|",
            f"| baseline | {b['chunks']} | {b['wall_seconds']:.1f} | {sum(b['seconds'].values()):.1f} | {b['max_rss_mb']:.0f} |",
            f"| ours ({o['dtype']}) | {o['chunks']} | {o['wall_seconds']:.1f} | {o['seconds']['pipeline']:.1f} | {o['max_rss_mb']:.0f} |",
            "", f"Wall-time ratio ours/baseline: **{o['wall_seconds'] / b['wall_seconds']:.2f}x** (goal <= 0.35x); "
            f"per chunk: {(o['wall_seconds'] / max(o['chunks'], 1)) / (b['wall_seconds'] / max(b['chunks'], 1)):.2f}x.",
            f"Baseline stage seconds: {', '.join(f'{k} {v:.1f}' for k, v in b['seconds'].items())}.",
            f"Ours: model {o['metadata'].get('embeddings', {}).get('chunks_per_second', '?')} chunks/s inside the embeddings stage; "
            f"stage seconds: {stage_seconds}.",
            f"Padding waste on our pipeline's chunks (mean {o['mean_tokens']:.0f} tokens): fixed 64 in input order "
            f"{o['padding_waste']['fixed64_input_order']:.1%}, fixed 64 length-sorted (what encode() does) "
            f"{o['padding_waste']['fixed64_length_sorted']:.1%}, token budget {o['padding_waste']['token_budget']:.1%}."]
    m = results["memory"]
    out += ["", "## 3. Memory (peak RSS of a full run, own process)", "",
            "| corpus | pages | chunks | peak RSS MB |", "|---|---|---|---|"]
    for r in m["rows"]:
        out.append(f"| {r['label']} | {r['pages']} | {r['chunks']} | {r['max_rss_mb']:.0f} |")
    out.append(f"\nGrowth 4N/N: **{m['growth']:.2f}x** (goal <= 1.5x).")
    s = results["search"]
    out += ["", f"## 4. Search ({s['vectors']} vectors: {s['real']} real from the 4N run + {s['synthetic']} noisy copies; "
            f"{s['queries']} noisy-copy queries; k=10; nprobe tuned to recall 0.95 on 100 separate queries)", "",
            "| index | p50 ms | p95 ms | p99 ms | batch-100 queries/s | recall@10 vs exact fp32 |", "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        out.append(f"| {r['index']} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['batch100_qps']:.0f} | {r['recall_at_10']:.3f} |")
    out += ["", "GPU (goal 6): not measured; no GPU device was lent to this session."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus and samples; under 5 minutes")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"),
                        help="markdown file whose performance section (quick or full) is replaced; default benchmarks/RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="only print, write no file")
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="full mode on this fraction of the corpus (4N = fraction of the HTML bytes, N = a quarter of it)")
    parser.add_argument("--child", choices=("baseline", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--sources", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        reset_peak_rss()
        result = (child_baseline if args.child == "baseline" else child_ours)(args.sources, args.work)
        result["max_rss_mb"] = peak_rss_mb()
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return

    started = time.perf_counter()
    quick = args.quick
    pages = corpus_pages(args.corpus)
    total_bytes = sum(p.stat().st_size for p in pages)
    # quick: N = 120 kB of HTML; full: N = a quarter of the corpus, 4N = all of it.
    small_bytes = 120_000 if quick else int(total_bytes * args.fraction) // 4
    small = page_prefix(pages, small_bytes)
    large = page_prefix(pages, 4 * small_bytes if quick or args.fraction < 1 else None)
    results: dict = {
        "mode": "quick" if quick else "full",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run" + (" --quick" if quick else "") + (f" --fraction {args.fraction}" if args.fraction != 1 else ""),
        "machine": machine(),
        "versions": _versions(),
        "corpus": f"{args.corpus} ({len(pages)} pages, {total_bytes / 1e6:.1f} MB HTML)",
        "load_before": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        src_small = copy_corpus(args.corpus, small, tmp / "src_small")
        src_large = copy_corpus(args.corpus, large, tmp / "src_large")

        log("encode: full 200-word windows of the 4N corpus")
        windows = [c for c in baseline.chunk_corpus(src_large / SOURCE) if len(c.split()) == baseline.WINDOW_WORDS]
        random.Random(1).shuffle(windows)
        results["encode"] = encode_bench(
            windows[: 48 if quick else 128], rounds=2 if quick else 3,
            dtypes=["float32", "bfloat16", "bfloat16-autocast", "float16", *int8_dtype()],
            budgets=[8192, 16384, 32768] if quick else [4096, 8192, 16384, 32768],
            threads=[] if quick else [1, 2],
        )
        log(json.dumps(results["encode"]["rows"], indent=None))

        log("pipeline: baseline then ours on the 4N corpus, each in its own process")
        base = run_child("baseline", src_large, tmp / "work_base")
        ours_large = run_child("ours", src_large, tmp / "work_large")
        results["pipeline"] = {"baseline": base, "ours": ours_large, "pages": len(large),
                               "html_mb": sum(p.stat().st_size for p in large) / 1e6}
        log(f"baseline {base['wall_seconds']:.1f}s ours {ours_large['wall_seconds']:.1f}s")

        log("memory: ours on the N corpus")
        ours_small = run_child("ours", src_small, tmp / "work_small")
        results["memory"] = {
            "rows": [{"label": "N", "pages": len(small), "chunks": ours_small["chunks"], "max_rss_mb": ours_small["max_rss_mb"]},
                     {"label": "4N", "pages": len(large), "chunks": ours_large["chunks"], "max_rss_mb": ours_large["max_rss_mb"]}],
            "growth": ours_large["max_rss_mb"] / ours_small["max_rss_mb"],
        }

        log("search: vectors of the 4N run")
        from resources import WarehouseResource

        rows = WarehouseResource(home=str(tmp / "work_large" / "home")).query_rows("SELECT vector FROM embeddings ORDER BY chunk_id")
        real = np.asarray([r[0] for r in rows], dtype=np.float32)
        results["search"] = search_bench(real, min_vectors=20_000 if quick else 40_000)
    results["total_seconds"] = time.perf_counter() - started
    results["load_after"] = os.getloadavg()[0]
    report = markdown(results)
    print(report)
    if not args.no_results:
        write_section(args.results, f"performance-{results['mode']}", report)


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    Appends the block when it is missing, so other benchmarks' sections (and the quick and full
    runs of this one) live side by side in one RESULTS.md.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.exists() else ""
    if start in current and end in current:
        head, rest = current.split(start, 1)
        updated = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        updated = current + ("\n" if current and not current.endswith("\n") else "") + block
    path.write_text(updated)


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "sentence-transformers", "transformers", "faiss-cpu"))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
