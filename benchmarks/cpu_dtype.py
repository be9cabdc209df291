"""Which CPU precision ``dtype=auto`` should pick on this machine: float32 against bfloat16 autocast.

    python -m benchmarks.cpu_dtype [--chunks 96] [--rounds 2]

Both through ``EmbeddingModelResource.encode`` with the CPU defaults (streams, threads), interleaved
(float32, bfloat16, float32, ...) so a busy machine slows both alike: chunks/s on ~200-word windows of the
Python docs (256-token input) and median milliseconds for a batch of 8 short queries (what the service's
``/search`` embeds). Prints the CPU's bf16-related flags: ``auto`` picks bfloat16 only with AMX (amx_bf16).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from benchmarks import baseline
from benchmarks.run import DEFAULT_CORPUS


def main(argv: list[str] | None = None) -> int:
    from resources.model import EmbeddingModelResource

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = parser.parse_args(argv)
    flags = set(Path("/proc/cpuinfo").read_text().split())
    print("cpu flags:", " ".join(sorted(f for f in flags if "bf16" in f or f.startswith("amx"))) or "none")
    files = baseline.html_files(args.corpus)
    random.Random(0).shuffle(files)
    chunks = [c for path in files[:40] for c in baseline.word_windows(baseline.page_text(path))]
    random.Random(1).shuffle(chunks)
    queries = [f"how do I {' '.join(c.split()[:8])} ({i})" for i, c in enumerate(chunks)]
    models = {d: EmbeddingModelResource(dtype=d, max_seq_length=256) for d in ("float32", "bfloat16")}
    for model in models.values():
        model.encode(["warm up"])
    rates: dict[str, list[float]] = {d: [] for d in models}
    query_ms: dict[str, list[float]] = {d: [] for d in models}
    used = 0
    for _ in range(args.rounds):
        for dtype, model in models.items():
            texts = chunks[used : used + args.chunks]
            used += args.chunks
            started = time.perf_counter()
            model.encode(texts)
            rates[dtype].append(len(texts) / (time.perf_counter() - started))
            for _ in range(5):
                batch, queries = queries[:8], queries[8:]
                started = time.perf_counter()
                model.encode(batch)
                query_ms[dtype].append(1000 * (time.perf_counter() - started))
    base_rate, base_ms = statistics.median(rates["float32"]), statistics.median(query_ms["float32"])
    for dtype in models:
        rate, ms = statistics.median(rates[dtype]), statistics.median(query_ms[dtype])
        print(f"{dtype:9s} {rate:6.1f} chunks/s ({rate / base_rate:.2f}x float32)   8 queries {ms:6.1f} ms "
              f"({ms / base_ms:.2f}x float32's time)")
    print("dtype=auto here:", EmbeddingModelResource().resolved_dtype())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
