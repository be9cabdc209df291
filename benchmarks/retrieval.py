"""Known-item retrieval benchmark (issue 14): does search find the page a query came from?

    python -m benchmarks.retrieval [--pages N] [--queries 400] [--config SPEC ...] [--work DIR] [--results FILE]

Corpus: Debian's python3.11-doc HTML (``apt-get install python3.11-doc``), pages in the fixed shuffled
order of ``benchmarks.run.corpus_pages``; ``--pages N`` takes the first N (develop on a subset, then run
the whole corpus once). Queries are derived from the pages themselves, half of each kind:

- ``heading``: an h2/h3 heading that no other page has (case-insensitive, at least two words) -> its page;
- ``sentence``: a sentence of a paragraph (10-30 words) that no other page has -> its page.

Scored at page level over the top 10 documents: Success@1, Success@10, MRR@10.

Rows, all in one run:

- ``naive``: BeautifulSoup text of every page, word windows of 200 every 150 (``benchmarks.baseline``),
  exact float32 inner-product search with the same model, hits folded to pages;
- one row per configuration (``--config chunk_tokens,overlap_tokens,min_chunk_tokens,contextual[,max_seq_length]``,
  the model's own 256 without the fifth number) and
  search mode: the project's own stages on a copy of the corpus (ingest, cleaning, chunking, dedup,
  embedding through the model resource and the cache resource, quantization, index build and publish)
  and ``embedding_assets.search.search_version`` on the published version, best chunk per document.

Embeddings are cached per text under ``--work`` (the project's cache resource), so a re-run embeds only
texts it has not seen: "model s" is the model time of *this* run (0 when everything came from the cache);
"tokens" is what a cold run embeds (the cost that does not depend on the cache).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import baseline
from benchmarks.run import DEFAULT_CORPUS, SOURCE, copy_corpus, corpus_pages

K = 10
HEADING_TAGS = ("h2", "h3")
SENTENCE_WORDS = (10, 30)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
DEFAULT_CONFIGS = ("382,0,261,1,384", "254,0,160,1,256", "318,0,210,1,320", "254,0,160,0,256", "240,36,160,1,256")  # the default first
MODES = ("vector", "lexical", "hybrid")


@dataclass(frozen=True)
class Query:
    text: str
    kind: str  # heading | sentence
    page: str  # relative path of the page it came from


# ---- queries ---------------------------------------------------------------------------------------

def _clean(text: str) -> str:
    return " ".join(text.replace("\u00b6", " ").split())


def page_items(html: bytes) -> tuple[list[str], list[str]]:
    """(headings, sentences) of one page: h2/h3 texts and the sentences of its <p> elements."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    body = tree.css_first("div.body") or tree.body
    if body is None:
        return [], []
    headings = [_clean(node.text()) for tag in HEADING_TAGS for node in body.css(tag)]
    sentences = []
    for node in body.css("p"):
        for sentence in _SENTENCE_SPLIT.split(_clean(node.text())):
            if SENTENCE_WORDS[0] <= len(sentence.split()) <= SENTENCE_WORDS[1]:
                sentences.append(sentence)
    return [h for h in headings if len(h.split()) >= 2], sentences


def derive_queries(root: Path, pages: list[Path], total: int, seed: int = 0) -> list[Query]:
    """Up to ``total`` known-item queries, half headings and half sentences, each unique to its page.

    Pages are visited in a seeded random order taking one item of each kind per page per round, so
    the queries spread over the corpus instead of coming from the longest pages.
    """
    items = {str(p.relative_to(root)): page_items(p.read_bytes()) for p in pages}
    heading_pages = Counter(h.lower() for hs, _ in items.values() for h in set(hs))
    sentence_pages = Counter(s for _, ss in items.values() for s in set(ss))
    rng = random.Random(seed)
    pools = {
        page: (
            [h for h in sorted(set(hs)) if heading_pages[h.lower()] == 1],
            [s for s in sorted(set(ss)) if sentence_pages[s] == 1],
        )
        for page, (hs, ss) in sorted(items.items())
    }
    for headings, sentences in pools.values():
        rng.shuffle(headings)
        rng.shuffle(sentences)
    order = sorted(pools)
    rng.shuffle(order)
    wanted = {"heading": total // 2, "sentence": total - total // 2}
    queries: list[Query] = []
    for round_ in range(10_000):
        added = False
        for page in order:
            for kind, pool in zip(("heading", "sentence"), pools[page]):
                if round_ < len(pool) and wanted[kind] > 0:
                    queries.append(Query(pool[round_], kind, page))
                    wanted[kind] -= 1
                    added = True
        if not added or not any(wanted.values()):
            break
    return queries


# ---- scoring -----------------------------------------------------------------------------------------

def score(ranked_pages: list[list[str]], queries: list[Query]) -> dict[str, float]:
    """Success@1, Success@10 and MRR@10 of page rankings (one list per query, best first)."""
    ranks = []
    for pages, query in zip(ranked_pages, queries):
        top = pages[:K]
        ranks.append(top.index(query.page) + 1 if query.page in top else None)
    n = len(queries)
    return {
        "success@1": sum(r == 1 for r in ranks) / n,
        "success@10": sum(r is not None for r in ranks) / n,
        "mrr@10": sum(1 / r for r in ranks if r) / n,
    }


# ---- embedding through the project's cache -------------------------------------------------------------

class CachedEncoder:
    """Embed texts with the model resource, through the project's embedding cache (keyed per text)."""

    def __init__(self, model, cache):
        from embedding_assets.core.identity import embedding_cache_key, text_sha256

        self.model, self.cache = model, cache
        self.key = lambda text: embedding_cache_key(model.model_fingerprint(), text_sha256(text))
        self.seconds = 0.0
        self.embedded = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        dim = self.model.dimension()
        keys = [self.key(t) for t in texts]
        out = np.empty((len(texts), dim), dtype=np.float32)
        hits = self.cache.lookup(keys, dim, unit_norm=True)
        misses = [i for i, hit in enumerate(hits) if hit is None]
        for i, hit in enumerate(hits):
            if hit is not None:
                out[i] = hit.vector
        for start in range(0, len(misses), 1024):
            batch = misses[start : start + 1024]
            vectors, stats = self.model.encode([texts[i] for i in batch])
            self.seconds += stats.seconds
            self.embedded += len(batch)
            out[batch] = vectors
            self.cache.set_many([(keys[i], vectors[j]) for j, i in enumerate(batch)])
        return out


# ---- the two sides --------------------------------------------------------------------------------------

def run_naive(root: Path, pages: list[Path], queries: list[Query], encode: CachedEncoder, query_vectors) -> dict:
    import faiss

    texts, owners = [], []
    seen: set[str] = set()
    for page in pages:
        for window in baseline.word_windows(baseline.page_text(page)):
            if window not in seen:  # the baseline's exact dedup
                seen.add(window)
                texts.append(window)
                owners.append(str(page.relative_to(root)))
    before_s, before_n = encode.seconds, encode.embedded
    vectors = encode(texts)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    _, ids = index.search(query_vectors, K * 20)
    ranked = [_fold([owners[i] for i in row if i >= 0]) for row in ids]
    tokenizer = encode.model.tokenizer()
    limit = encode.model.effective_max_seq_length() - 2
    tokens = sum(min(len(ids), limit) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
    return {"row": "naive (200/150 words, exact float32)", "mode": "vector", "chunks": len(texts),
            "tokens": tokens, "model_seconds": encode.seconds - before_s, "embedded_now": encode.embedded - before_n,
            **score(ranked, queries)}


def _fold(pages: list[str]) -> list[str]:
    """Chunk hits -> distinct pages in rank order."""
    out: list[str] = []
    for page in pages:
        if page not in out:
            out.append(page)
    return out


def prepare_base(sources: Path, base: Path) -> None:
    """Ingest and clean the corpus once; every configuration starts from a copy of this warehouse."""
    from embedding_assets.stages.cleaned_documents import clean_source
    from embedding_assets.stages.raw_documents import ingest_source
    from resources import WarehouseResource

    if (base / "warehouse.duckdb").exists():
        shutil.rmtree(base)
    warehouse = WarehouseResource(home=str(base))
    ingest_source(warehouse, sources, SOURCE, max_file_bytes=100 * 2**20)
    clean_source(warehouse, SOURCE)


def run_config(spec: str, base: Path, home: Path, queries: list[Query], query_vectors, model, cache) -> list[dict]:
    """The project's stages from chunking to a published index under one configuration; one row per mode."""
    from embedding_assets.core.chunking import ChunkingSettings, max_chunk_tokens
    from embedding_assets.core.dedup import MinHashSettings
    from embedding_assets.stages.chunks import chunk_source
    from embedding_assets.stages.deduped_chunks import dedup_source
    from embedding_assets.stages.embeddings import embed_source
    from embedding_assets.stages.faiss_index import IndexSettings, build_and_publish
    from embedding_assets.stages.quantized_embeddings import quantize_source
    from resources import IndexStoreResource, WarehouseResource
    from resources.model import EmbeddingModelResource

    chunk_tokens, overlap, minimum, contextual, *rest = (int(x) for x in spec.split(","))
    settings = ChunkingSettings(chunk_tokens, overlap, minimum, bool(contextual))
    if rest:  # a model input other than the model's own 256 (EMBEDDING_MAX_SEQ_LENGTH; the pipeline's default is 384)
        model = EmbeddingModelResource(max_seq_length=rest[0], dtype=model.dtype)
        query_vectors = CachedEncoder(model, cache)([q.text for q in queries])
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    shutil.copyfile(base / "warehouse.duckdb", home / "warehouse.duckdb")
    warehouse = WarehouseResource(home=str(home))
    tokenizer = model.tokenizer()
    max_tokens = max_chunk_tokens(tokenizer, model.effective_max_seq_length())
    chunked = chunk_source(warehouse, SOURCE, tokenizer=tokenizer, tokenizer_fingerprint=model.tokenizer_fingerprint(),
                           max_tokens=max_tokens, settings=settings)
    dedup_source(warehouse, SOURCE, settings=MinHashSettings())
    embedded = embed_source(warehouse, SOURCE, model=model, cache=cache)
    quantize_source(warehouse, SOURCE, model_fingerprint=model.model_fingerprint())
    store = IndexStoreResource(home=str(home))
    report, _ = build_and_publish(warehouse, store, model_fingerprint=model.model_fingerprint(),
                                  dimension=model.dimension(), settings=IndexSettings(),
                                  query_encoder=lambda texts: model.encode(texts)[0])
    version = store.open_current()
    tokens = warehouse.query_rows(
        """SELECT coalesce(sum(k.token_count), 0) FROM chunks k JOIN chunk_dedup x USING (chunk_id)
           WHERE x.status = 'canonical'""")[0][0]
    label = f"project {chunk_tokens}/{overlap}/{minimum}" + (" contextual" if contextual else "")
    label += f", max_seq_length {rest[0]}" if rest else ""
    common = {"row": label, "config": spec, "chunks": report.count, "chunks_before_dedup": chunked.live_chunks,
              "tokens": int(tokens), "model_seconds": embedded.model_seconds, "embedded_now": embedded.embedded_by_model,
              "index": f"{report.layout} nprobe {report.nprobe} x{report.rescore_multiplier}"}
    # The same chunks searched exactly over their float32 vectors: what chunking and context give, apart
    # from what the published index's approximation (binary IVF + int8 rescoring) takes away.
    import faiss

    stored = warehouse.query_rows(
        """SELECT d.relative_path, e.vector FROM embeddings e JOIN chunks k USING (chunk_id)
           JOIN documents d USING (doc_id) WHERE e.model_fingerprint = ?""", [model.model_fingerprint()])
    exact = faiss.IndexFlatIP(model.dimension())
    exact.add(np.asarray([vector for _, vector in stored], dtype=np.float32))
    _, ids = exact.search(query_vectors, K * 20)
    ranked = [_fold([stored[i][0] for i in row if i >= 0]) for row in ids]
    rows = [{**common, "mode": "vector, exact float32", **score(ranked, queries)}]
    # One query at a time, as the service searches: FAISS on one thread (as benchmarks.run and index_memory
    # time search), else its OpenMP threads spin against numpy's on a shared machine and time noise, not search.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        rows += _search_rows(version, queries, query_vectors, common)
    finally:
        faiss.omp_set_num_threads(threads)
    return rows


def _search_rows(version, queries: list[Query], query_vectors, common: dict) -> list[dict]:
    """One row per search mode over the published version: scores and the median seconds per query."""
    from embedding_assets.search import search_version

    rows = []
    for mode in MODES:
        search_version(version, queries[0].text, query_vectors[0], K, mode=mode)  # loads the lexical index once
        ranked, seconds = [], []
        for i, q in enumerate(queries):
            started = time.perf_counter()
            hits = search_version(version, q.text, query_vectors[i], K, mode=mode)
            seconds.append(time.perf_counter() - started)
            ranked.append([hit.doc_path for hit in hits])
        rows.append({**common, "mode": mode, "search_p50_ms": 1000 * float(np.median(seconds)), **score(ranked, queries)})
    return rows


# ---- report ---------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = "| row | mode | index | chunks | tokens embedded | model s (this run) | search p50 ms | Success@1 | Success@10 | MRR@10 |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    return head + "\n".join(_table_row(r) for r in rows)


def _table_row(r: dict) -> str:
    index = r.get("index", "") if "search_p50_ms" in r else ""
    p50 = f"{r['search_p50_ms']:.2f}" if "search_p50_ms" in r else ""
    return (f"| {r['row']} | {r['mode']} | {index} | {r['chunks']:,} | {r['tokens']:,} | {r['model_seconds']:.0f} | {p50} "
            f"| {r['success@1']:.3f} | {r['success@10']:.3f} | {r['mrr@10']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--pages", type=int, default=None, help="first N pages of the shuffled corpus (default: all)")
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--config", action="append",
                        help="chunk_tokens,overlap,min_chunk_tokens,contextual(0/1)[,max_seq_length]")
    parser.add_argument("--work", type=Path, default=Path(".bench_retrieval"), help="work folder; its cache/ is kept")
    parser.add_argument("--results", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--dtype", default="auto", help="the model's dtype for every row (EMBEDDING_DTYPE; int8 for issue 15's bound)")
    args = parser.parse_args()

    from resources import EmbeddingCacheResource
    from resources.model import EmbeddingModelResource

    started = time.perf_counter()
    pages = corpus_pages(args.corpus)
    pages = pages[: args.pages] if args.pages else pages
    work = args.work.resolve()
    sources = work / "sources"
    if sources.exists():
        shutil.rmtree(sources)
    copy_corpus(args.corpus, pages, sources)
    queries = derive_queries(args.corpus, pages, args.queries)
    print(f"{len(pages)} pages, {len(queries)} queries "
          f"({sum(q.kind == 'heading' for q in queries)} headings, {sum(q.kind == 'sentence' for q in queries)} sentences)",
          flush=True)
    model = EmbeddingModelResource(max_seq_length=None, dtype=args.dtype)  # the model's own 256, as a hand-written pipeline has it
    cache = EmbeddingCacheResource(home=str(work / "shared"), redis_url=None)
    encode = CachedEncoder(model, cache)
    query_vectors = encode([q.text for q in queries])

    rows = []
    if not args.no_naive:
        rows.append(run_naive(args.corpus, pages, queries, encode, query_vectors))
        print(table(rows[-1:]), flush=True)
    prepare_base(sources, work / "base")
    for spec in args.config or DEFAULT_CONFIGS:
        rows += run_config(spec, work / "base", work / "runs" / spec.replace(",", "-"), queries, query_vectors, model, cache)
        print(table(rows[-len(MODES) - 1 :]), flush=True)

    print()
    print(table(rows))
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "pages": len(pages), "queries": len(queries), "seconds": round(time.perf_counter() - started, 1),
        "machine": platform.processor() or platform.machine(),
        "lscpu_model": subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout.strip(),
        "dtype": model.resolved_dtype(),
    }
    print(json.dumps(meta))
    if args.results:
        args.results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
