"""Chunking: a cleaned document -> token-bounded chunks (stage ``chunks``).

This module owns how a ``CleanedDocument`` is cut into passages the model embeds whole.
Cuts follow the document's structure: every section (a run of headings and the text
blocks under them) starts a new chunk that begins with its heading; small blocks of a
section are packed together; a block too long for one chunk is split at sentence, then
word, then token boundaries, with overlap between the pieces of that block.

Guarantees of ``chunk_document``, on any input:

- every chunk has ``token_count <= min(settings.chunk_tokens, max_tokens)``, counted by the
  same tokenizer without special tokens;
- ``chunk.text == doc.text[chunk.start:chunk.end]``, never empty, never starting or ending
  with whitespace; chunks are ordered by start, ordinals are ``0..n-1``;
- the same document, tokenizer and settings give the same chunks.

All lengths are measured on one tokenization of each block (a single batched call) using
the tokenizer's offset mapping; a final batched call recounts every chunk and splits any
chunk whose recount exceeds the limit (re-tokenizing a substring can differ at its edges).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from embedding_assets.core.cleaning import Block, CleanedDocument
from embedding_assets.core.identity import fingerprint

CHUNKER_VERSION: str = "1"

# Cut priorities between token i-1 and token i: higher is a more natural place to cut.
_CUT_BLOCK = 4  # a block boundary (paragraph, list item, code block...)
_CUT_SENTENCE = 3  # token i starts a sentence or a line
_CUT_SPACE = 2  # whitespace between the tokens
_CUT_WORD = 1  # the tokenizer's pre-tokenizer sees a new word (punctuation, CJK characters)
_CUT_TOKEN = 0  # inside a word

# A position right after a sentence end (or a line break inside a code block).
_SENTENCE_START = re.compile(r"(?:[.!?\u2026](?:[\"')\]]*)\s+|[\u3002\uff01\uff1f]\s*|\n)")

_MAX_RESPLIT_ROUNDS = 64


class ChunkingError(ValueError):
    """Settings or limits under which no valid chunk can be produced."""


@dataclass(frozen=True)
class ChunkingSettings:
    """How large chunks are, in tokens of the embedding model's tokenizer (special tokens excluded).

    ``chunk_tokens``: target maximum per chunk; ``overlap_tokens``: tokens repeated between
    consecutive pieces of one split block (~15%); ``min_chunk_tokens``: a trailing chunk smaller
    than this is merged into the previous chunk of its section when the merge still fits.
    """

    chunk_tokens: int = 240
    overlap_tokens: int = 36
    min_chunk_tokens: int = 48


@dataclass(frozen=True)
class Chunk:
    """One passage: ``text == cleaned.text[start:end]``; ``token_count`` excludes special tokens."""

    ordinal: int
    text: str
    start: int
    end: int
    heading_path: tuple[str, ...]
    token_count: int


def max_chunk_tokens(tokenizer: Any, max_seq_length: int) -> int:
    """Tokens of text that fit in one model input: ``max_seq_length`` minus the special tokens added.

    Raises:
        ChunkingError: nothing is left for text (``max_seq_length`` too small).
    """
    limit = max_seq_length - tokenizer.num_special_tokens_to_add(pair=False)
    if limit < 1:
        raise ChunkingError(f"max_seq_length {max_seq_length} leaves no room for text after special tokens")
    return limit


def chunking_fingerprint(settings: ChunkingSettings, tokenizer_fingerprint: str, max_tokens: int) -> str:
    """Fingerprint of everything that changes chunk boundaries."""
    return fingerprint(
        "chunker",
        {
            "version": CHUNKER_VERSION,
            "chunk_tokens": settings.chunk_tokens,
            "overlap_tokens": settings.overlap_tokens,
            "min_chunk_tokens": settings.min_chunk_tokens,
            "tokenizer": tokenizer_fingerprint,
            "max_tokens": max_tokens,
        },
    )


# ---------------------------------------------------------------------------------------------
# Tokens of a section
# ---------------------------------------------------------------------------------------------


@dataclass
class _Section:
    """Token view of a run of headings plus the text blocks under them.

    ``starts``/``ends`` are absolute character offsets of each token; ``priority[i]`` is how
    natural a cut before token i is; ``block_of[i]`` is the index (within the section) of the
    block holding token i; ``block_first`` lists each block's first token index.
    """

    heading_path: tuple[str, ...]
    starts: list[int]
    ends: list[int]
    priority: list[int]
    block_of: list[int]
    block_first: list[int]
    heading_tokens: int  # tokens of the leading heading run (0 when the section has no heading)


def _tokenize(tokenizer: Any, texts: list[str]) -> Any:
    # verbose=False: long blocks are expected here; the "sequence longer than max length" warning is noise.
    return tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )


def _document_blocks(doc: CleanedDocument) -> tuple[Block, ...]:
    if doc.blocks:
        return doc.blocks
    stripped = doc.text.strip()
    if not stripped:
        return ()
    start = doc.text.index(stripped)
    return (Block(kind="text", start=start, end=start + len(stripped), level=0, heading_path=()),)


def _append_block_tokens(
    section: _Section,
    base: int,
    offsets: list[tuple[int, int]],
    word_ids: list[int | None],
    sentence_starts: set[int] | frozenset[int],
    local_index: int,
) -> None:
    """Add one block's tokens (offsets relative to ``base``) to ``section`` with their cut priorities."""
    section.block_first.append(len(section.starts))
    for token_index, (token_start, token_end) in enumerate(offsets):
        start, end = base + token_start, base + token_end
        if token_index == 0:
            priority = _CUT_BLOCK
        elif start in sentence_starts:
            priority = _CUT_SENTENCE
        elif start > section.ends[-1]:
            priority = _CUT_SPACE
        elif word_ids[token_index] != word_ids[token_index - 1]:
            priority = _CUT_WORD
        else:
            priority = _CUT_TOKEN
        section.starts.append(start)
        section.ends.append(end)
        section.priority.append(priority)
        section.block_of.append(local_index)


def _sections(doc: CleanedDocument, tokenizer: Any) -> list[_Section]:
    """Group blocks into sections and tokenize all blocks in one batched call."""
    blocks = _document_blocks(doc)
    if not blocks:
        return []
    encoding = _tokenize(tokenizer, [doc.text[b.start : b.end] for b in blocks])
    sentence_starts = {m.end() for m in _SENTENCE_START.finditer(doc.text)}

    # A heading opens a new section unless it directly follows another heading: "Guide" then
    # "Install" belong together at the top of the chunk for Install's text.
    groups: list[list[int]] = []
    for index, block in enumerate(blocks):
        previous_is_heading = index > 0 and blocks[index - 1].kind == "heading"
        if not groups or (block.kind == "heading" and not previous_is_heading):
            groups.append([])
        groups[-1].append(index)

    sections: list[_Section] = []
    for group in groups:
        text_blocks = [blocks[i] for i in group if blocks[i].kind != "heading"]
        if text_blocks:
            path = text_blocks[0].heading_path
        else:
            last = blocks[group[-1]]
            path = last.heading_path + (doc.text[last.start : last.end],)
        section = _Section(path, [], [], [], [], [], 0)
        for local_index, block_index in enumerate(group):
            block = blocks[block_index]
            first = len(section.starts)
            _append_block_tokens(
                section,
                base=block.start,
                offsets=encoding["offset_mapping"][block_index],
                word_ids=encoding.word_ids(block_index),
                sentence_starts=sentence_starts,
                local_index=local_index,
            )
            if block.kind == "heading" and section.heading_tokens == first:
                section.heading_tokens = len(section.starts)
        if section.starts:
            sections.append(section)
    return sections


# ---------------------------------------------------------------------------------------------
# Cutting a section into token ranges
# ---------------------------------------------------------------------------------------------


def _best_cut(section: _Section, start: int, stop: int, limit: int, min_chunk: int) -> int:
    """Where to end the chunk that begins at token ``start`` (exclusive end, ``start < cut <= stop``).

    ``stop`` is ``start + limit`` (the furthest legal end). Prefer the last block boundary
    (when the chunk is not tiny and holds more than the section's headings), then the last
    sentence start, whitespace or word boundary that keeps the chunk at least half full, else
    cut exactly at the limit (inside a word).
    """
    priority = section.priority
    half = start + max(1, limit // 2)
    block_floor = start + max(1, min_chunk)
    if start < section.heading_tokens:
        block_floor = max(block_floor, section.heading_tokens + 1)
    best_by_priority: dict[int, int] = {}
    for cut in range(stop, start, -1):
        p = priority[cut]
        if p not in best_by_priority:
            best_by_priority[p] = cut
        if p == _CUT_BLOCK and cut >= block_floor:
            return cut
        if cut < half and cut < block_floor:
            break  # nothing further down can win
    for p in (_CUT_SENTENCE, _CUT_SPACE, _CUT_WORD):
        cut = best_by_priority.get(p)
        if cut is not None and cut >= half:
            return cut
    return stop


def _overlap_start(section: _Section, cut: int, start: int, overlap: int) -> int:
    """First token of the next piece when a block is split at ``cut``: back up ~``overlap`` tokens.

    The overlap stays inside the block being split and begins at a word start when one
    exists, so the repeated text is whole words.
    """
    if overlap <= 0:
        return cut
    block_start = section.block_first[section.block_of[cut]]
    lowest = max(cut - overlap, block_start, start + 1)
    if lowest >= cut:
        return cut
    for wanted in (_CUT_SPACE, _CUT_WORD):
        for candidate in range(lowest, cut):
            if section.priority[candidate] >= wanted:
                return candidate
    return lowest


def _cut_section(section: _Section, limit: int, overlap: int, min_chunk: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of a section's chunks, each at most ``limit`` tokens."""
    count = len(section.starts)
    ranges: list[tuple[int, int]] = []
    start = 0
    while start < count:
        if count - start <= limit:
            ranges.append((start, count))
            break
        cut = _best_cut(section, start, start + limit, limit, min_chunk)
        ranges.append((start, cut))
        start = cut if section.priority[cut] == _CUT_BLOCK else _overlap_start(section, cut, start, overlap)
    return _merge_tiny_tail(ranges, limit, min_chunk)


def _merge_tiny_tail(ranges: list[tuple[int, int]], limit: int, min_chunk: int) -> list[tuple[int, int]]:
    """Merge chunks under ``min_chunk`` tokens into the previous chunk when the union fits."""
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and end - start < min_chunk and end - merged[-1][0] <= limit:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


# ---------------------------------------------------------------------------------------------
# Verification against the tokenizer
# ---------------------------------------------------------------------------------------------


def _split_span(text: str, span_start: int, span_end: int, tokenizer: Any, limit: int) -> list[tuple[int, int]]:
    """Split ``text[span_start:span_end]`` into spans of at most ``limit`` tokens of its own tokenization.

    Cuts prefer sentence, whitespace and word boundaries in the second half of each window;
    every piece is strictly shorter than the span, so repeated splitting terminates.
    """
    piece = text[span_start:span_end]
    encoding = _tokenize(tokenizer, [piece])
    section = _Section((), [], [], [], [], [], 0)
    _append_block_tokens(
        section,
        base=span_start,
        offsets=encoding["offset_mapping"][0],
        word_ids=encoding.word_ids(0),
        sentence_starts=frozenset(span_start + m.end() for m in _SENTENCE_START.finditer(piece)),
        local_index=0,
    )
    ranges = _cut_section(section, limit, overlap=0, min_chunk=0)
    return [_trim(text, section.starts[s], section.ends[e - 1]) for s, e in ranges]


def _split_or_halve(text: str, start: int, end: int, tokenizer: Any, limit: int) -> list[tuple[int, int]]:
    """:func:`_split_span`, or, when its token cuts cannot shorten the span (one word whose tokens share
    characters, e.g. a Hangul syllable split into jamo), the span cut at its middle character: every
    round makes the pieces strictly shorter, so splitting ends at single characters."""
    pieces = _split_span(text, start, end, tokenizer, limit)
    if len(pieces) > 1 and all(e - s < end - start for s, e in pieces):
        return pieces
    if end - start < 2:
        return [(start, end)]  # one character over the limit: _enforce_limit gives up with a clear error
    middle = (start + end) // 2
    return [piece for piece in (_trim(text, start, middle), _trim(text, middle, end)) if piece[1] > piece[0]]


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    encoding = tokenizer(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return [len(ids) for ids in encoding["input_ids"]]


def _enforce_limit(
    text: str, spans: list[tuple[int, int, tuple[str, ...]]], tokenizer: Any, limit: int
) -> list[tuple[int, int, tuple[str, ...], int]]:
    """Recount every span with the tokenizer; split those over ``limit`` until all fit.

    Returns ``(start, end, heading_path, token_count)`` in document order.
    """
    checked: list[tuple[int, int, tuple[str, ...], int]] = []
    pending = spans
    for _ in range(_MAX_RESPLIT_ROUNDS):
        counts = _token_counts(tokenizer, [text[s:e] for s, e, _ in pending])
        over: list[tuple[int, int, tuple[str, ...]]] = []
        for (start, end, path), count in zip(pending, counts):
            if count <= limit:
                checked.append((start, end, path, count))
            else:
                over.append((start, end, path))
        if not over:
            return sorted(checked, key=lambda span: (span[0], span[1]))
        pending = [
            (start, end, path)
            for span_start, span_end, path in over
            for start, end in _split_or_halve(text, span_start, span_end, tokenizer, limit)
        ]
    raise ChunkingError(f"could not split text into chunks of at most {limit} tokens")


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink ``[start, end)`` so the span neither starts nor ends with whitespace."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def validate_settings(settings: ChunkingSettings, max_tokens: int) -> int:
    """The effective token limit of these settings; ChunkingError naming the setting when they are invalid."""
    limit = min(settings.chunk_tokens, max_tokens)
    if limit < 1:
        raise ChunkingError(
            f"chunk limit must be positive, got chunk_tokens={settings.chunk_tokens}, max_tokens={max_tokens}"
        )
    if settings.overlap_tokens < 0 or settings.min_chunk_tokens < 0:
        raise ChunkingError(f"overlap_tokens and min_chunk_tokens must be >= 0: {settings}")
    return limit


def chunk_document(doc: CleanedDocument, tokenizer: Any, settings: ChunkingSettings, max_tokens: int) -> list[Chunk]:
    """Cut a cleaned document into chunks of at most ``min(settings.chunk_tokens, max_tokens)`` tokens.

    Args:
        doc: a cleaned document (its blocks drive the cuts; without blocks the text is one block).
        tokenizer: a Hugging Face fast tokenizer (offset mappings and word ids are required).
        settings: chunk size, overlap and minimum size in tokens.
        max_tokens: the model's text capacity, e.g. ``max_chunk_tokens(tokenizer, 256)``.

    Returns:
        Chunks in document order with ordinals ``0..n-1``; an empty list when the text has no
        tokens at all (e.g. only characters the tokenizer ignores).

    Raises:
        ChunkingError: invalid settings (non-positive limit, negative overlap or minimum).
    """
    limit = validate_settings(settings, max_tokens)
    # Overlap is capped so that every split advances by at least a quarter of the limit.
    overlap = min(settings.overlap_tokens, limit // 4)
    min_chunk = min(settings.min_chunk_tokens, limit)

    spans: list[tuple[int, int, tuple[str, ...]]] = []
    for section in _sections(doc, tokenizer):
        for first, stop in _cut_section(section, limit, overlap, min_chunk):
            # Token offsets of some tokenizers include a leading space; chunks never do.
            start, end = _trim(doc.text, section.starts[first], section.ends[stop - 1])
            if start < end:
                spans.append((start, end, section.heading_path))

    # A span whose text has no tokens at all carries nothing to embed.
    checked = [span for span in _enforce_limit(doc.text, spans, tokenizer, limit) if span[3] > 0]
    return [
        Chunk(ordinal=ordinal, text=doc.text[start:end], start=start, end=end, heading_path=path, token_count=count)
        for ordinal, (start, end, path, count) in enumerate(checked)
    ]
