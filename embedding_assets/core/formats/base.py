"""What every format module returns, and how raw blocks become a ``CleanedDocument``.

A format module turns bytes into ``RawBlock``s (text, heading level, preformatted or not, page);
``assemble`` normalizes their typography, drops empty ones, computes heading paths and offsets,
picks the title and detects the language. So the invariant below is established in one place:

``text`` is the blocks joined by ``"\\n\\n"``; no block contains ``"\\n\\n"`` or starts/ends with
whitespace; ``text[block.start:block.end]`` is the block's text; blocks are in order and do not
overlap. ``assemble`` runs in time linear in the size of its input.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from embedding_assets.core.formats.language import detect_language


class CleaningError(ValueError):
    """A document cannot yield text (unsupported suffix, binary, encrypted, corrupt, or nothing left after cleaning)."""


@dataclass(frozen=True)
class Block:
    """One structural unit of a cleaned document.

    ``kind`` is ``"heading"`` or ``"text"`` (paragraphs, list items, code, table rows...);
    ``doc.text[start:end]`` is the block's text; ``level`` is 1..6 for headings, 0 for text;
    ``heading_path`` holds the titles of the enclosing headings (a heading's ancestors, not itself);
    ``page`` is the 1-based page the block comes from where the format has pages (PDF), else None.
    """

    kind: str
    start: int
    end: int
    level: int
    heading_path: tuple[str, ...]
    page: int | None = None


@dataclass(frozen=True)
class CleanedDocument:
    """Plain text of a document, its blocks, title, ISO 639-1 language (or "unknown") and warnings."""

    text: str
    blocks: tuple[Block, ...]
    title: str | None
    language: str
    warnings: tuple[str, ...]


@dataclass
class RawBlock:
    """A block before normalization: ``level`` > 0 for headings; ``preformatted`` keeps lines."""

    text: str
    level: int = 0
    preformatted: bool = False
    page: int | None = None


@dataclass
class Parsed:
    """What a format's ``parse`` returns: raw blocks in document order, a title if the file names one, warnings."""

    blocks: list[RawBlock]
    title: str | None = None
    warnings: list[str] | None = None


# ---------------------------------------------------------------------------------------------
# Typography
# ---------------------------------------------------------------------------------------------

_TYPOGRAPHY_TABLE = str.maketrans(
    {
        **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2035", "'"),
        **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u2036\u00ab\u00bb", '"'),
        **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63", "-"),
        # Zero-width characters, soft hyphen, BOM and bidi marks: invisible, they only split words.
        **dict.fromkeys(
            "\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
            None,
        ),
        # Other line separators become plain newlines so callers see one line structure.
        **dict.fromkeys("\u2028\u2029\u0085\f\v", "\n"),
    }
)
_CONTROL_CHARS = re.compile(r"[\x01-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_WHITESPACE = re.compile(r"\s+")


def normalize_typography(text: str) -> str:
    """Normalize typography while keeping line structure.

    NFKC; curly quotes -> ``'`` / ``"``; en/em dashes and minus -> ``-``; non-breaking and
    thin spaces -> space; zero-width characters, bidi marks and soft hyphens removed; other
    control characters removed; ``\\r\\n``/``\\r`` -> ``\\n``; runs of spaces and tabs collapsed
    to one space. Newlines are kept (callers decide about paragraphs and blocks).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():  # NFKC never changes ASCII text; skipping it on ASCII saves most of its cost
        text = unicodedata.normalize("NFKC", text)
    text = text.translate(_TYPOGRAPHY_TABLE)
    text = _CONTROL_CHARS.sub("", text)
    return _HORIZONTAL_SPACE.sub(" ", text)


def _block_text(raw: RawBlock) -> str:
    text = normalize_typography(raw.text)
    if raw.preformatted:
        # Code keeps its lines, but never a blank line: "\n\n" is the block separator.
        lines = (line.strip() for line in text.split("\n"))
        return "\n".join(line for line in lines if line)
    return _WHITESPACE.sub(" ", text).strip()


def assemble(parsed: Parsed, source: str) -> CleanedDocument:
    """Normalize raw blocks, drop empty ones, compute heading paths, offsets, title and language.

    Heading levels above 6 are read as 6; a heading closes every open heading of its level or deeper.
    The title is the format's own (HTML ``<title>``, front matter, document properties) when it has
    one, else the first level-1 heading, else the first heading.

    Raises:
        CleaningError: no block has text (``source`` names the document in the message).
    """
    texts: list[str] = []
    blocks: list[Block] = []
    heading_stack: list[tuple[int, str]] = []
    path: tuple[str, ...] = ()
    offset = 0
    first_h1: str | None = None
    first_heading: str | None = None
    for raw in parsed.blocks:
        text = _block_text(raw)
        if not text:
            continue
        if raw.level > 0:
            level = min(raw.level, 6)
            while heading_stack and heading_stack[-1][0] >= level:
                heading_stack.pop()
            heading_path = tuple(t for _, t in heading_stack)
            heading_stack.append((level, text))
            path = tuple(t for _, t in heading_stack)
            kind = "heading"
            first_heading = first_heading or text
            if level == 1:
                first_h1 = first_h1 or text
        else:
            level = 0
            heading_path = path
            kind = "text"
        if texts:
            offset += 2
        blocks.append(Block(kind, offset, offset + len(text), level, heading_path, raw.page))
        texts.append(text)
        offset += len(text)
    if not blocks:
        raise CleaningError(f"no text after cleaning ({source})")
    doc_text = "\n\n".join(texts)
    title = parsed.title
    if title is not None:
        title = _WHITESPACE.sub(" ", normalize_typography(title)).strip() or None
    return CleanedDocument(
        text=doc_text,
        blocks=tuple(blocks),
        title=title or first_h1 or first_heading,
        language=detect_language(doc_text),
        warnings=tuple(parsed.warnings or ()),
    )
