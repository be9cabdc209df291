"""Edit locality of chunking: how many chunks a single-paragraph edit makes the pipeline embed again.

    python -m benchmarks.edit_locality [--edits 50] [--pages N] [--seed 0] [--settings 382,0,261] [--max-seq-length 384]

Corpus: Debian's python3.11-doc HTML, cleaned by the project's cleaner. Each edit picks a random page
and a random paragraph (text block) of it and either inserts a new paragraph after it (a paragraph
copied from another page), deletes it, or changes it (a sentence appended). The page is chunked
before and after with the project's chunker and default settings; an edit costs the chunks whose
embedded (contextual) text did not exist before — exactly what the embeddings stage sends to the model.
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path

from embedding_assets.core.chunking import ChunkingSettings, chunk_document, contextual_text
from embedding_assets.core.cleaning import Block, CleanedDocument, clean_document

EDIT_KINDS = ("insert", "delete", "change")
CHANGE_SENTENCE = " This sentence was added by an edit to see which chunks change."


def rebuild(doc: CleanedDocument, blocks: list[tuple[Block, str]]) -> CleanedDocument:
    """A cleaned document made of ``(block, text)`` pairs joined by blank lines (the cleaner's invariant)."""
    parts, out, position = [], [], 0
    for block, text in blocks:
        out.append(replace(block, start=position, end=position + len(text)))
        parts.append(text)
        position += len(text) + 2
    return replace(doc, text="\n\n".join(parts), blocks=tuple(out))


def edit(doc: CleanedDocument, kind: str, rng: random.Random, donor: str) -> CleanedDocument | None:
    """``doc`` with one paragraph inserted, deleted or changed; None when it has no text paragraph."""
    pairs = [(b, doc.text[b.start : b.end]) for b in doc.blocks]
    candidates = [i for i, (b, _) in enumerate(pairs) if b.kind == "text"]
    if not candidates:
        return None
    i = rng.choice(candidates)
    block, text = pairs[i]
    if kind == "insert":
        pairs.insert(i + 1, (block, donor))
    elif kind == "delete":
        del pairs[i]
        if not pairs:
            return None
    else:
        pairs[i] = (block, text + CHANGE_SENTENCE)
    return rebuild(doc, pairs)


def embedded_texts(doc: CleanedDocument, tokenizer, settings: ChunkingSettings, max_tokens: int) -> Counter:
    return Counter(contextual_text(c.context, c.text) for c in chunk_document(doc, tokenizer, settings, max_tokens))


def measure(docs: list[CleanedDocument], tokenizer, settings: ChunkingSettings, max_tokens: int, edits: int,
            seed: int = 0) -> dict:
    """Mean/max chunks re-embedded per edit and the edited pages' chunk counts, over ``edits`` random edits."""
    rng = random.Random(seed)
    donors = [d.text[b.start : b.end] for d in docs for b in d.blocks if b.kind == "text" and 80 <= b.end - b.start <= 600]
    costs: list[int] = []
    by_kind: dict[str, list[int]] = {k: [] for k in EDIT_KINDS}
    sizes: list[int] = []
    while len(costs) < edits:
        doc = rng.choice(docs)
        kind = EDIT_KINDS[len(costs) % len(EDIT_KINDS)]
        edited = edit(doc, kind, rng, rng.choice(donors))
        if edited is None:
            continue
        before = embedded_texts(doc, tokenizer, settings, max_tokens)
        after = embedded_texts(edited, tokenizer, settings, max_tokens)
        cost = sum((after - before).values())
        costs.append(cost)
        by_kind[kind].append(cost)
        sizes.append(sum(before.values()))
    return {
        "edits": len(costs),
        "mean_reembedded": statistics.mean(costs),
        "max_reembedded": max(costs),
        "mean_by_kind": {k: round(statistics.mean(v), 2) for k, v in by_kind.items() if v},
        "mean_page_chunks": statistics.mean(sizes),
    }


def load_docs(root: Path, pages: int | None) -> list[CleanedDocument]:
    from benchmarks.run import corpus_pages

    chosen = corpus_pages(root)[:pages] if pages else corpus_pages(root)
    return [clean_document(p.read_bytes(), ".html") for p in chosen]


def main() -> None:
    from transformers import AutoTokenizer

    from benchmarks.run import DEFAULT_CORPUS
    from embedding_assets.core.chunking import max_chunk_tokens
    from embedding_assets.settings import Settings
    from resources.model import EmbeddingModelResource

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--pages", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--settings", default=None, help="chunk_tokens,overlap_tokens,min_chunk_tokens (default: the defaults)")
    parser.add_argument("--max-seq-length", type=int, default=Settings().max_seq_length,
                        help="model input in tokens (default: the pipeline's, EMBEDDING_MAX_SEQ_LENGTH)")
    args = parser.parse_args()
    model = EmbeddingModelResource(max_seq_length=args.max_seq_length)
    tokenizer = AutoTokenizer.from_pretrained(str(model.model_path()))
    max_tokens = max_chunk_tokens(tokenizer, model.effective_max_seq_length())
    settings = ChunkingSettings(*(int(x) for x in args.settings.split(","))) if args.settings else ChunkingSettings()
    docs = load_docs(args.corpus, args.pages)
    chunks = sum(len(chunk_document(d, tokenizer, settings, max_tokens)) for d in docs)
    result = measure(docs, tokenizer, settings, max_tokens, args.edits, args.seed)
    print({"settings": settings, "max_tokens": max_tokens, "pages": len(docs), "chunks": chunks, **result})


if __name__ == "__main__":
    main()
