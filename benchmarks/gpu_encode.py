"""The model resource's encode path on a GPU in float16 against plain ``SentenceTransformer.encode``.

Two steps, so the GPU machine (which has torch, transformers and sentence-transformers but neither Dagster
nor this project's other dependencies) needs only this file, ``resources/encoding.py``, a model folder and
a texts file:

``python -m benchmarks.gpu_encode build --out DIR``  (here) writes DIR/texts.json.gz: real text (the Python
documentation's reST sources, /usr/share/doc/python3.11/html/_sources) cut at token boundaries into pieces of
20-256 model tokens, uniform, plus a float16 copy of the default model in DIR/model (half the bytes).

``python -m benchmarks.gpu_encode run --dir DIR --out OUTDIR``  (on the GPU) times, on the same texts:
(a) ``SentenceTransformer.encode(texts, batch_size=B, convert_to_numpy=True)`` with the model in float16;
(b) this project's path — ``EmbeddingModelResource.encode``'s loop: token counts, length-sorted packing by
``plan_batches`` up to a token budget, tokenizing on the calling thread while the previous batch runs, and
``run_batches``' out-of-memory backoff — for several token budgets. Then the backoff for real: the process's
CUDA memory capped with ``torch.cuda.set_per_process_memory_fraction`` and a budget far above what fits, the
run completes by halving, and its vectors are compared with the uncapped run's. Prints JSON lines and writes
OUTDIR/gpu_encode.json. Results: benchmarks/RESULTS.md (gpu-encode section).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")


def build(out: Path, count: int, seed: int = 7) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from resources.model import EmbeddingModelResource

    src = EmbeddingModelResource().model_path()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    shutil.copytree(src, model_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx"))
    weights = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              model_dir / "model.safetensors", metadata={"format": "pt"})  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    rng = random.Random(seed)
    texts: list[str] = []
    files = sorted(SOURCES.rglob("*.rst.txt"))
    rng.shuffle(files)
    for file in files:
        doc = " ".join(file.read_text(errors="replace").split())
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        pos = 0
        while pos + 20 < len(offsets) and len(texts) < count:
            take = rng.randint(20, 254)  # + [CLS] and [SEP]: 22..256 model tokens
            piece = offsets[pos : pos + take]
            texts.append(doc[piece[0][0] : piece[-1][1]])
            pos += take
        if len(texts) >= count:
            break
    with gzip.open(out / "texts.json.gz", "wt") as fh:
        json.dump(texts, fh)
    print(json.dumps({"texts": len(texts), "files": files.index(file) + 1, "model": str(model_dir)}))


def run(data: Path, out: Path, budgets: list[tuple[int, int, int, int]], plain_batches: list[int], repeats: int, limit_texts: int,
        oom_first: bool = False, both_counts: bool = True) -> None:
    import concurrent.futures

    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    from resources.encoding import embed_features, guarded, plan_batches, run_batches, run_on

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    with gzip.open(data / "texts.json.gz", "rt") as fh:
        texts: list[str] = json.load(fh)[: limit_texts or None]
    cuda = torch.cuda.is_available()  # without CUDA: a smoke run of this script on CPU (float32), no OOM part
    model = SentenceTransformer(str(data / "model"), device="cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    (model.half() if cuda else model.float()).eval()
    limit = model.max_seq_length
    env = {"gpu": torch.cuda.get_device_name() if cuda else "none (CPU smoke run)", "torch": torch.__version__, "transformers": transformers.__version__,
           "sentence_transformers": sentence_transformers.__version__, "texts": len(texts), "max_seq_length": limit}  # fmt: skip
    counts = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    lengths = np.minimum(np.asarray(counts) + 2, limit)
    env.update(mean_tokens=round(float(lengths.mean()), 1), min_tokens=int(lengths.min()), max_tokens=int(lengths.max()))
    print(json.dumps(env), flush=True)
    results: dict = {"env": env, "plain": [], "ours": []}

    def plain(batch_size: int) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

    def ours(budget: int, max_batch: int, known_counts: bool = True, tokenizers: int = 0,
             direct: int = 0) -> tuple[np.ndarray, int]:
        """EmbeddingModelResource.encode's loop (resources/model.py), CUDA: one stream, two batches queued.

        ``tokenizers`` > 0 (an experiment, not what model.py does): batches are tokenized on that many threads
        ahead of the one forward thread, ``tokenizers + 1`` batches in flight. ``direct`` (also an experiment):
        the tokenizer called directly instead of ``SentenceTransformer.preprocess``.
        """
        n = counts if known_counts else [len(i) for i in model.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        lens = np.minimum(np.asarray(n, dtype=np.int64) + 2, limit)
        vectors = np.empty((len(texts), model.get_sentence_embedding_dimension()), dtype=np.float32)

        def prepared(batch: np.ndarray):
            from sentence_transformers.util import batch_to_device

            chosen = [texts[i] for i in batch]
            if direct:
                features = dict(model.tokenizer(chosen, padding=True, truncation=True, max_length=limit, return_tensors="pt"))
                return batch_to_device({**features, "modality": "text"}, model.device)
            return batch_to_device(model.preprocess(chosen), model.device)

        batches = plan_batches(lens, budget, max_batch)
        forward = lambda features: embed_features(model, features, contextlib.nullcontext)  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(1) as pool, concurrent.futures.ThreadPoolExecutor(max(1, tokenizers)) as tok:
            submit = run_on(pool, prepared, forward)
            if tokenizers:
                safe = guarded(forward)
                submit = lambda batch: tok.submit(lambda: pool.submit(safe, prepared(batch)).result())  # noqa: E731
            ran = run_batches(batches, lens, vectors, submit, max_pending=max(2, tokenizers + 1), token_budget=budget,
                              device=str(model.device))  # fmt: skip
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, len(ran)

    def timed(fn, *args, **kwargs):
        seconds = []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            value = fn(*args, **kwargs)
            sync()
            seconds.append(time.perf_counter() - started)
        return value, statistics.median(seconds), seconds

    def oom_backoff() -> dict:
        # Out-of-memory backoff for real: cap this process's CUDA memory, ask for batches far above it.
        uncapped, _ = ours(65536, 4096)
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        cap_bytes = 2 << 30
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total)
        torch.cuda.reset_peak_memory_stats()
        warnings: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                warnings.append(record.getMessage())

        keep = Keep(logging.WARNING)
        logging.getLogger("embedding_pipeline.model").addHandler(keep)
        oom: dict = {"memory_cap_gib": cap_bytes / 2**30, "token_budget": 1 << 24, "batch_size": 1 << 20}
        try:
            started = time.perf_counter()
            vectors, batches = ours(1 << 24, 1 << 20)
            seconds = time.perf_counter() - started
            oom.update(completed=True, batches=batches, halvings=len(warnings), seconds=round(seconds, 3),
                       chunks_per_s=round(len(texts) / seconds), first_warning=warnings[0] if warnings else None,
                       last_warning=warnings[-1] if warnings else None,
                       max_abs_diff_vs_uncapped=float(np.abs(vectors - uncapped).max()),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))  # fmt: skip
            # and the same capped process with the default-sized budget: no halving needed
            warnings.clear()
            started = time.perf_counter()
            ours(65536, 4096)
            seconds = time.perf_counter() - started
            oom.update(capped_65536_chunks_per_s=round(len(texts) / seconds), capped_65536_halvings=len(warnings))
        except Exception as exc:  # noqa: BLE001 - recorded, the figure says it failed
            oom.update(completed=False, error=f"{type(exc).__name__}: {exc}", halvings=len(warnings))
        finally:
            logging.getLogger("embedding_pipeline.model").removeHandler(keep)
            torch.cuda.set_per_process_memory_fraction(1.0)
        print(json.dumps(oom), flush=True)
        return oom

    if cuda and oom_first:
        results["oom_backoff"] = oom_backoff()
    # warm-up: kernels for every shape class, the allocator, the tokenizer
    plain(128)
    ours(65536, 4096)

    reference = None
    for batch_size in plain_batches:
        vectors, seconds, each = timed(plain, batch_size)
        reference = vectors if reference is None else reference
        row = {"path": "plain SentenceTransformer.encode", "batch_size": batch_size, "seconds": round(seconds, 3),
               "chunks_per_s": round(len(texts) / seconds), "runs": [round(s, 3) for s in each]}  # fmt: skip
        results["plain"].append(row)
        print(json.dumps(row), flush=True)
    best_plain = max(r["chunks_per_s"] for r in results["plain"])
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    for budget, max_batch, tokenizers, direct in budgets:
        for known in (True, False) if both_counts else (True,):
            (vectors, batches), seconds, each = timed(ours, budget, max_batch, known, tokenizers, direct)
            cos = float(np.min(np.sum(vectors * ref, axis=1)))
            row = {"path": "ours", "token_budget": budget, "batch_size": max_batch, "token_counts_given": known,
                   "tokenizer_threads": tokenizers, "direct_tokenizer": bool(direct),
                   "batches": batches, "seconds": round(seconds, 3), "chunks_per_s": round(len(texts) / seconds),
                   "vs_best_plain": round(len(texts) / seconds / best_plain, 2), "min_cosine_vs_plain": round(cos, 5),
                   "runs": [round(s, 3) for s in each]}  # fmt: skip
            results["ours"].append(row)
            print(json.dumps(row), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    if cuda and not oom_first:
        results["oom_backoff"] = oom_backoff()
    (out / "gpu_encode.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--count", type=int, default=30000)
    r = sub.add_parser("run")
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--budgets", default="16384:128,16384:1024,65536:4096,131072:4096,262144:8192",
                   help="token_budget:batch_size[:tokenizer threads[:1 = tokenizer called directly]] for our path")  # fmt: skip
    r.add_argument("--plain-batches", default="32,128,512")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--oom-first", action="store_true", help="run the out-of-memory part before the timings")
    r.add_argument("--given-counts-only", action="store_true", help="skip the runs that count tokens inside the timing")
    r.add_argument("--limit", type=int, default=0, help="use only the first N texts (smoke runs)")
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.out, args.count)
    else:
        budgets = [tuple(int(x) for x in (pair + ":0:0").split(":")[:4]) for pair in args.budgets.split(",")]
        run(args.dir, args.out, budgets, [int(x) for x in args.plain_batches.split(",")], args.repeats,
            args.limit, args.oom_first, not args.given_counts_only)  # fmt: skip


if __name__ == "__main__":
    main()
