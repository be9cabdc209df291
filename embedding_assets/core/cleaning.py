"""Cleaning: raw document bytes -> plain text with structure (stage ``cleaned_documents``).

The formats themselves live in ``core/formats/`` (one module per format, a registry of suffixes);
this module is the entry point the stages use: ``clean_document`` and the per-format
``cleaning_fingerprint``. Decoding, typography and language detection are shared by every format
(``formats.decode``, ``formats.base``, ``formats.language``) and versioned by ``CLEANER_VERSION``.

Invariant of every ``CleanedDocument``: ``text`` is its blocks joined by ``"\\n\\n"``, no
block contains ``"\\n\\n"`` or starts/ends with whitespace, and
``text[block.start:block.end]`` is the block's text, blocks in order and non-overlapping.
Blocks carry a heading path (titles of the enclosing headings) and a page where the format has
pages (PDF). Every format parses in time linear in the size of its input.
"""

from __future__ import annotations

from embedding_assets.core.formats import FORMATS, SUPPORTED_SUFFIXES, format_for
from embedding_assets.core.formats import decode as _decode
from embedding_assets.core.formats.base import Block, CleanedDocument, CleaningError, assemble, normalize_typography
from embedding_assets.core.formats.decode import decode_bytes
from embedding_assets.core.formats.language import LANGUAGE_DETECTOR, LANGUAGE_SAMPLE_CHARS, detect_language
from embedding_assets.core.identity import fingerprint

# What every format shares: decoding, typography, assembly, language detection. Bumping it re-cleans
# every document; a change to one format bumps that format's own VERSION instead.
CLEANER_VERSION: str = "2"

__all__ = [
    "CLEANER_VERSION", "SUPPORTED_SUFFIXES", "Block", "CleanedDocument", "CleaningError", "clean_document",
    "cleaning_fingerprint", "decode_bytes", "detect_language", "normalize_typography",
]  # fmt: skip


def clean_document(data: bytes, suffix: str) -> CleanedDocument:
    """Clean one raw document.

    Args:
        data: the file's raw bytes.
        suffix: its file suffix (``".html"``, ``".md"``, ``".pdf"``...), case-insensitive, with the dot.

    Returns:
        A ``CleanedDocument`` whose offsets invariant holds (see the module docstring).

    Raises:
        CleaningError: unsupported suffix, binary content, an encrypted, scanned or corrupt PDF/DOCX,
            or no text after cleaning; the message is the reason recorded in the quarantine table.
    """
    fmt = format_for(suffix)
    return assemble(fmt.parse(data), f"{suffix.lower()} document of {len(data)} bytes")


def cleaning_fingerprint(suffix: str) -> str:
    """Fingerprint of everything that changes the cleaned output of a document with this suffix:
    the shared ``CLEANER_VERSION``, the decoder's and language detector's versions, and the format's
    own name and ``VERSION``. Documents of other formats keep their fingerprint when one format changes.

    Raises:
        CleaningError: the suffix is not supported.
    """
    fmt = format_for(suffix)
    return fingerprint(
        "cleaner",
        {
            "version": CLEANER_VERSION,
            "decode": _decode.VERSION,
            "language": [LANGUAGE_DETECTOR, LANGUAGE_SAMPLE_CHARS],
            "format": fmt.name,
            "format_version": fmt.version,
        },
    )


def cleaning_fingerprints() -> dict[str, str]:
    """Every supported suffix -> its cleaning fingerprint."""
    return {suffix: cleaning_fingerprint(suffix) for f in FORMATS for suffix in f.suffixes}
