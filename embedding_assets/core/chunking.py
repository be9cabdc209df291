"""Chunking: a cleaned document -> token-bounded chunks (stage ``chunks``).

This module owns how a ``CleanedDocument`` is cut into passages the model embeds whole, and what
the model reads of each passage (its *contextual* text).

**Edit-local boundaries.** The document is one stream of tokens; every place between two tokens
has a priority (a section start beats a paragraph/block boundary, which beats a sentence start,
whitespace, a word boundary, the inside of a word). A chunk that starts at token ``s`` ends at the
best place in its window ``[s + min_chunk_tokens, s + limit]`` — best by priority, then by a hash
of the few characters that follow the place — never at "the last place that fits". Which place
wins depends only on the text near it, so after an insert, delete or change of one paragraph the
chunking upstream of it is unchanged and the chunking downstream picks the same winners again as
soon as a winner lies in both the old and the new window: an edit re-embeds the chunks holding it
and, typically, one neighbour (``benchmarks/retrieval.py`` measures it, tests/test_chunking.py
checks the bound on random edits). Chunks may span a section boundary when the window holds no
section start; a chunk's heading path is that of the section holding most of its tokens. A block
split inside (a cut below block priority) repeats ~``overlap_tokens`` tokens in the next chunk.

**Contextual text.** With ``contextual`` on, the model reads ``context + "\\n\\n" + text`` where
``context`` is the document title and the chunk's heading path (``"Title > H2 > H3"``), shortened
to fit the room the chunk leaves in the model's input; the chunk's ``text`` (what is stored and
shown) stays a slice of the document.

Guarantees of ``chunk_document``, on any input:

- every chunk has ``token_count <=`` the limit (``chunk_tokens``, at most ``max_tokens``) and
  ``embed_token_count <= max_tokens``, counted by the same tokenizer without special tokens;
- ``chunk.text == doc.text[chunk.start:chunk.end]``, never empty, never starting or ending
  with whitespace; chunks are ordered by start, ordinals are ``0..n-1``; every non-whitespace
  character that has tokens lies in some chunk;
- the same document, tokenizer and settings give the same chunks.

All lengths are measured on one tokenization of each block (a single batched call) using
the tokenizer's offset mapping; a final batched call recounts every chunk and splits any
chunk whose recount exceeds the limit (re-tokenizing a substring can differ at its edges).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

from embedding_assets.core.cleaning import Block, CleanedDocument
from embedding_assets.core.identity import fingerprint

# 2: edit-local cuts (best-keyed boundary in a window, across sections) and contextual text.
CHUNKER_VERSION: str = "2"
# How the contextual text is built from title, heading path and text (bump when the format changes).
CONTEXT_FORMAT_VERSION: str = "1"
CONTEXT_SEPARATOR = " > "

# Cut priorities between token i-1 and token i: higher is a more natural place to cut.
_CUT_SECTION = 5  # a heading that starts a section
_CUT_BLOCK = 4  # a block boundary (paragraph, list item, code block...)
_CUT_SENTENCE = 3  # token i starts a sentence or a line
_CUT_SPACE = 2  # whitespace between the tokens (also: between a heading and its first paragraph)
_CUT_WORD = 1  # the tokenizer's pre-tokenizer sees a new word (punctuation, CJK characters)
_CUT_TOKEN = 0  # inside a word

# A section start ends a chunk once the chunk holds this share of min_chunk_tokens (see _best_cut).
SECTION_FLOOR_SHARE = 0.5
_KEY_CHARS = 32  # characters after a boundary hashed into its key (see _key)

# A position right after a sentence end (or a line break inside a code block).
_SENTENCE_START = re.compile(r"(?:[.!?\u2026](?:[\"')\]]*)\s+|[\u3002\uff01\uff1f]\s*|\n)")

_MAX_RESPLIT_ROUNDS = 64


class ChunkingError(ValueError):
    """Settings or limits under which no valid chunk can be produced."""


@dataclass(frozen=True)
class ChunkingSettings:
    """How large chunks are, in tokens of the embedding model's tokenizer (special tokens excluded).

    ``chunk_tokens``: maximum tokens of a chunk's text, None = all the model input holds
    (``max_tokens``); ``overlap_tokens``: tokens repeated after a cut inside a block;
    ``min_chunk_tokens``: the smallest chunk a cut may leave (the start of the window a cut is chosen
    in, so chunks are between it and the limit except a document's last one), None =
    ``MIN_CHUNK_SHARE`` of the limit; ``contextual``: the model reads title and heading path before the text.
    Defaults are the measured best (benchmarks/RESULTS.md, "Chunk size and model input"): relative to the model input, so
    a shorter or longer ``max_seq_length`` keeps the same shape of window (a floor at the limit would
    leave no slack for edit-local cuts).
    """

    chunk_tokens: int | None = None
    overlap_tokens: int = 0
    min_chunk_tokens: int | None = None
    contextual: bool = True


# The default floor as a share of the limit: 260 of 380 tokens, the measured best (at a 254 limit: 174).
MIN_CHUNK_SHARE = 260 / 380


@dataclass(frozen=True)
class Chunk:
    """One passage: ``text == cleaned.text[start:end]``; ``token_count`` excludes special tokens.

    ``context`` is what the model reads before the text (empty when contextual text is off);
    ``embed_token_count`` counts the tokens of ``contextual_text(context, text)``.
    """

    ordinal: int
    text: str
    start: int
    end: int
    heading_path: tuple[str, ...]
    token_count: int
    context: str = ""
    embed_token_count: int = 0


def contextual_text(context: str, text: str) -> str:
    """The text the model embeds for a chunk: its context, a blank line, its text (text alone without context)."""
    return f"{context}\n\n{text}" if context else text


def context_parts(title: str | None, heading_path: tuple[str, ...]) -> list[str]:
    """Title then heading path, the title left out when the first heading already says it
    (HTML titles are usually "<h1> - <site name>")."""
    parts = [h.strip() for h in heading_path if h.strip()]
    title = (title or "").strip()
    if title and not (parts and title.startswith(parts[0])):
        parts.insert(0, title)
    return parts


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
    """Fingerprint of everything that changes chunk boundaries or the text the model reads."""
    return fingerprint(
        "chunker",
        {
            "version": CHUNKER_VERSION,
            "chunk_tokens": settings.chunk_tokens,
            "overlap_tokens": settings.overlap_tokens,
            "min_chunk_tokens": settings.min_chunk_tokens,
            "context": CONTEXT_FORMAT_VERSION if settings.contextual else "off",
            "tokenizer": tokenizer_fingerprint,
            "max_tokens": max_tokens,
        },
    )


# ---------------------------------------------------------------------------------------------
# The document as one token stream
# ---------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """Token view of a document (or of one span when re-splitting).

    ``starts``/``ends`` are absolute character offsets of each token; ``priority[i]`` is how
    natural a cut before token i is; ``block_of[i]`` is the index of the block holding token i;
    ``block_first`` lists each block's first token index; ``section_of[i]`` indexes ``paths``.
    """

    starts: list[int]
    ends: list[int]
    priority: list[int]
    block_of: list[int]
    block_first: list[int]
    section_of: list[int]
    paths: list[tuple[str, ...]]


def _empty_stream() -> _Stream:
    return _Stream([], [], [], [], [], [], [()])


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
    stream: _Stream,
    base: int,
    offsets: list[tuple[int, int]],
    word_ids: list[int | None],
    sentence_starts: set[int] | frozenset[int],
    first_priority: int,
    section: int,
) -> None:
    """Add one block's tokens (offsets relative to ``base``) to ``stream`` with their cut priorities."""
    if not offsets:
        return
    block_index = len(stream.block_first)
    stream.block_first.append(len(stream.starts))
    for token_index, (token_start, token_end) in enumerate(offsets):
        start, end = base + token_start, base + token_end
        if token_index == 0:
            priority = first_priority
        elif start in sentence_starts:
            priority = _CUT_SENTENCE
        elif start > stream.ends[-1]:
            priority = _CUT_SPACE
        elif word_ids[token_index] != word_ids[token_index - 1]:
            priority = _CUT_WORD
        else:
            priority = _CUT_TOKEN
        stream.starts.append(start)
        stream.ends.append(end)
        stream.priority.append(priority)
        stream.block_of.append(block_index)
        stream.section_of.append(section)


def _stream(doc: CleanedDocument, tokenizer: Any) -> _Stream:
    """Tokenize all blocks in one batched call and give every place between tokens its priority.

    A heading starts a section (priority ``_CUT_SECTION``) unless it directly follows another
    heading: "Guide" then "Install" stay together. The place after a heading run, before its
    first paragraph, is only as good as whitespace, so a heading is not left at a chunk's end.
    A heading run belongs to the section of the text under it.
    """
    stream = _empty_stream()
    blocks = _document_blocks(doc)
    if not blocks:
        return stream
    encoding = _tokenize(tokenizer, [doc.text[b.start : b.end] for b in blocks])
    sentence_starts = {m.end() for m in _SENTENCE_START.finditer(doc.text)}
    block_paths: list[tuple[str, ...]] = [()] * len(blocks)
    for index in range(len(blocks) - 1, -1, -1):
        block = blocks[index]
        if block.kind != "heading":
            block_paths[index] = block.heading_path
        elif index + 1 < len(blocks):
            block_paths[index] = block_paths[index + 1]
        else:
            block_paths[index] = block.heading_path + (doc.text[block.start : block.end],)
    stream.paths = sorted(set(block_paths))
    path_index = {path: i for i, path in enumerate(stream.paths)}
    for index, block in enumerate(blocks):
        after_heading = index > 0 and blocks[index - 1].kind == "heading"
        if after_heading:
            priority = _CUT_SPACE
        else:
            priority = _CUT_SECTION if block.kind == "heading" else _CUT_BLOCK
        _append_block_tokens(
            stream,
            base=block.start,
            offsets=encoding["offset_mapping"][index],
            word_ids=encoding.word_ids(index),
            sentence_starts=sentence_starts,
            first_priority=priority,
            section=path_index[block_paths[index]],
        )
    return stream


# ---------------------------------------------------------------------------------------------
# Cutting the document's token stream into token ranges
# ---------------------------------------------------------------------------------------------


def _key(text: str, stream: _Stream, cut: int) -> tuple[int, int]:
    """How much a cut before token ``cut`` is preferred: its priority, then a hash of the text that follows.

    The hash looks only at ``_KEY_CHARS`` characters either side, so whether a boundary wins its window
    depends on nearby content alone, never on where the document or the section starts. Both sides,
    because paragraphs often begin alike ("Changed in version 3.3: ...") and equal keys would fall
    back to position, i.e. to a running count.
    """
    start = stream.starts[cut]
    window = text[max(0, start - _KEY_CHARS) : start + _KEY_CHARS]
    return stream.priority[cut], zlib.crc32(window.encode("utf-8", "surrogatepass"))


def _best_cut(text: str, stream: _Stream, start: int, limit: int, floor: int, tail: int) -> int:
    """Where the chunk that begins at token ``start`` ends (exclusive, ``start < cut <= start + limit``).

    A section start at or past ``floor * SECTION_FLOOR_SHARE`` tokens wins (the last such one, so
    small sections are packed together); a section start just past the limit pulls the window back so
    that the next chunk can end at it. Otherwise the cut is the best-keyed boundary (see ``_key``) in
    the window ``[start + floor, start + limit]``, the window also leaving at least ``tail`` tokens
    for the next chunk. Because the winner is chosen by
    content rather than by being the last boundary that fits, two chunkings that start a few tokens
    apart (an edit upstream) pick the same boundary whenever it lies in both windows: the chunks after
    an edit fall back into step after one chunk instead of shifting to the end of the document.
    """
    count = len(stream.starts)
    high = min(start + limit, count - tail)
    low = min(start + max(1, floor), high)
    if high <= start:  # the rest is too short to leave a tail: cut at the limit
        return start + limit
    # A section start anywhere past the section floor wins: chunkings that drifted apart after an edit
    # meet again at the next section, and chunks follow the document's structure where it is cheap.
    section_floor = max(1, int(floor * SECTION_FLOOR_SHARE))
    # The last one: small sections in the same window are packed together.
    for cut in range(high, start + section_floor - 1, -1):
        if stream.priority[cut] == _CUT_SECTION:
            return cut
    # A section starting just past this chunk's reach: end early enough that the next chunk can end at it.
    for ahead in range(start + limit + 1, min(start + limit + section_floor, count)):
        if stream.priority[ahead] == _CUT_SECTION:
            high = max(start + 1, min(high, ahead - section_floor))
            low = min(low, high)
            break
    best, best_key = high, None
    for cut in range(high, low - 1, -1):
        key = _key(text, stream, cut)
        if best_key is None or key > best_key:
            best, best_key = cut, key
    return best


def _overlap_start(stream: _Stream, cut: int, start: int, overlap: int) -> int:
    """First token of the next piece when a block is split at ``cut``: back up ~``overlap`` tokens.

    The overlap stays inside the block being split and begins at a word start when one
    exists, so the repeated text is whole words.
    """
    if overlap <= 0:
        return cut
    block_start = stream.block_first[stream.block_of[cut]]
    lowest = max(cut - overlap, block_start, start + 1)
    if lowest >= cut:
        return cut
    for wanted in (_CUT_SPACE, _CUT_WORD):
        for candidate in range(lowest, cut):
            if stream.priority[candidate] >= wanted:
                return candidate
    return lowest


def _cut_stream(text: str, stream: _Stream, limit: int, overlap: int, floor: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the chunks, each at most ``limit`` tokens (see ``_best_cut``)."""
    count = len(stream.starts)
    ranges: list[tuple[int, int]] = []
    start = 0
    tail = min(floor, limit) // 2  # never leave a sliver as the document's last chunk
    while start < count:
        if count - start <= limit:
            ranges.append((start, count))
            break
        cut = _best_cut(text, stream, start, limit, floor, tail)
        ranges.append((start, cut))
        start = cut if stream.priority[cut] >= _CUT_BLOCK else _overlap_start(stream, cut, start, overlap)
    return ranges


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
    stream = _empty_stream()
    _append_block_tokens(
        stream,
        base=span_start,
        offsets=encoding["offset_mapping"][0],
        word_ids=encoding.word_ids(0),
        sentence_starts=frozenset(span_start + m.end() for m in _SENTENCE_START.finditer(piece)),
        first_priority=_CUT_BLOCK,
        section=0,
    )
    ranges = _cut_stream(text, stream, limit, overlap=0, floor=limit // 2)
    return [_trim(text, stream.starts[s], stream.ends[e - 1]) for s, e in ranges]


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
# Contextual text
# ---------------------------------------------------------------------------------------------


def _truncate_to_tokens(tokenizer: Any, text: str, tokens: int) -> str:
    """The longest prefix of ``text`` made of its first ``tokens`` tokens, trimmed ("" for tokens < 1)."""
    if tokens < 1:
        return ""
    offsets = _tokenize(tokenizer, [text])["offset_mapping"][0]
    if len(offsets) <= tokens:
        return text
    return text[: offsets[tokens - 1][1]].strip()


def _contexts(title: str | None, spans: list[tuple[int, int, tuple[str, ...], int]], tokenizer: Any,
              max_tokens: int) -> list[str]:
    """The context of each checked span: title and heading path, shortened to the room its text leaves.

    Shortening keeps what says most about the chunk: the whole path when it fits, else the title (or
    top heading) and the last heading, else the last heading cut to the room left.
    """
    full: dict[tuple[str, ...], str] = {}
    short: dict[tuple[str, ...], str] = {}
    for _, _, path, _ in spans:
        if path not in full:
            parts = context_parts(title, path)
            full[path] = CONTEXT_SEPARATOR.join(parts)
            short[path] = CONTEXT_SEPARATOR.join(parts[:1] + parts[-1:]) if len(parts) > 2 else full[path]
    variants = sorted(set(full.values()) | set(short.values()))
    counts = dict(zip(variants, _token_counts(tokenizer, variants)))
    contexts = []
    for _, _, path, count in spans:
        room = max_tokens - count
        if counts[full[path]] <= room:
            contexts.append(full[path])
        elif counts[short[path]] <= room:
            contexts.append(short[path])
        else:
            last = context_parts(title, path)[-1:] or [""]
            contexts.append(_truncate_to_tokens(tokenizer, last[0], room))
    return contexts


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def validate_settings(settings: ChunkingSettings, max_tokens: int) -> int:
    """The effective token limit of these settings; ChunkingError naming the setting when they are invalid."""
    limit = max_tokens if settings.chunk_tokens is None else min(settings.chunk_tokens, max_tokens)
    if limit < 1:
        raise ChunkingError(
            f"chunk limit must be positive, got chunk_tokens={settings.chunk_tokens}, max_tokens={max_tokens}"
        )
    if settings.overlap_tokens < 0 or (settings.min_chunk_tokens or 0) < 0:
        raise ChunkingError(f"overlap_tokens and min_chunk_tokens must be >= 0: {settings}")
    return limit


def chunk_floor(settings: ChunkingSettings, limit: int) -> int:
    """The smallest chunk a cut may leave under ``limit``: ``min_chunk_tokens``, or its share of the limit when unset."""
    wanted = round(limit * MIN_CHUNK_SHARE) if settings.min_chunk_tokens is None else settings.min_chunk_tokens
    return min(wanted, limit)


def _majority_path(stream: _Stream, first: int, stop: int) -> tuple[str, ...]:
    """Heading path of the section holding most of tokens ``first..stop-1`` (the earliest on a tie)."""
    counts: dict[int, int] = {}
    for section in stream.section_of[first:stop]:
        counts[section] = counts.get(section, 0) + 1
    return stream.paths[max(counts, key=lambda s: (counts[s], -s))]


def chunk_document(doc: CleanedDocument, tokenizer: Any, settings: ChunkingSettings, max_tokens: int) -> list[Chunk]:
    """Cut a cleaned document into chunks of at most ``validate_settings(settings, max_tokens)`` tokens.

    Args:
        doc: a cleaned document (its blocks drive the cuts; without blocks the text is one block).
        tokenizer: a Hugging Face fast tokenizer (offset mappings and word ids are required).
        settings: chunk size, overlap, smallest chunk in tokens; contextual text on or off.
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
    floor = chunk_floor(settings, limit)

    stream = _stream(doc, tokenizer)
    spans: list[tuple[int, int, tuple[str, ...]]] = []
    for first, stop in _cut_stream(doc.text, stream, limit, overlap, floor):
        # Token offsets of some tokenizers include a leading space; chunks never do.
        start, end = _trim(doc.text, stream.starts[first], stream.ends[stop - 1])
        if start < end:
            spans.append((start, end, _majority_path(stream, first, stop)))

    # A span whose text has no tokens at all carries nothing to embed.
    checked = [span for span in _enforce_limit(doc.text, spans, tokenizer, limit) if span[3] > 0]
    contexts = _contexts(doc.title, checked, tokenizer, max_tokens) if settings.contextual else [""] * len(checked)
    embed_counts = _token_counts(tokenizer, [contextual_text(c, doc.text[s:e]) for c, (s, e, _, _) in zip(contexts, checked)])
    chunks = []
    for ordinal, ((start, end, path, count), context, embed_count) in enumerate(zip(checked, contexts, embed_counts)):
        if embed_count > max_tokens:  # the joined text tokenized longer than its parts: embed the text alone
            context, embed_count = "", count
        chunks.append(Chunk(ordinal=ordinal, text=doc.text[start:end], start=start, end=end, heading_path=path,
                            token_count=count, context=context, embed_token_count=embed_count))
    return chunks
