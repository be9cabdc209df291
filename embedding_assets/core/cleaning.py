"""Cleaning: raw document bytes -> plain text with structure (stage ``cleaned_documents``).

This module owns how a raw file becomes text a model should read: decoding (BOMs, invalid
UTF-8, NUL bytes, binary detection), typography normalization, per-format markup removal
(HTML via BeautifulSoup + lxml, Markdown, reStructuredText, plain text) and language
detection. The result keeps the document's structure as ``Block``s (headings and text
blocks with character offsets and heading paths) so chunking can split along it.

Invariant of every ``CleanedDocument``: ``text`` is its blocks joined by ``"\\n\\n"``, no
block contains ``"\\n\\n"`` or starts/ends with whitespace, and
``text[block.start:block.end]`` is the block's text, blocks in order and non-overlapping.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.dammit import EncodingDetector
from bs4.element import PreformattedString, Script, Stylesheet, TemplateString
from langdetect import DetectorFactory, LangDetectException, detect

from embedding_assets.core.identity import fingerprint

CLEANER_VERSION: str = "1"
SUPPORTED_SUFFIXES: frozenset[str] = frozenset({".html", ".htm", ".md", ".markdown", ".txt", ".rst"})

# langdetect is randomized; a fixed seed makes the same text always get the same language.
DetectorFactory.seed = 0

_LANGUAGE_SAMPLE_CHARS = 3000
_MIN_LETTERS_FOR_LANGUAGE = 20
_BINARY_SAMPLE_CHARS = 8192


class CleaningError(ValueError):
    """A document cannot yield text (unsupported suffix, binary content, nothing left after cleaning)."""


@dataclass(frozen=True)
class Block:
    """One structural unit of a cleaned document.

    ``kind`` is ``"heading"`` or ``"text"`` (paragraphs, list items, code, table rows...);
    ``doc.text[start:end]`` is the block's text; ``level`` is 1..6 for headings, 0 for text;
    ``heading_path`` holds the titles of the enclosing headings (a heading's ancestors, not itself).
    """

    kind: str
    start: int
    end: int
    level: int
    heading_path: tuple[str, ...]


@dataclass(frozen=True)
class CleanedDocument:
    """Plain text of a document, its blocks, title, ISO 639-1 language (or "unknown") and warnings."""

    text: str
    blocks: tuple[Block, ...]
    title: str | None
    language: str
    warnings: tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

# UTF-32 LE must be tested before UTF-16 LE: its BOM starts with the UTF-16 LE BOM.
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (b"\x00\x00\xfe\xff", "utf-32-be", "decoded as UTF-32 (BOM)"),
    (b"\xff\xfe\x00\x00", "utf-32-le", "decoded as UTF-32 (BOM)"),
    (b"\xef\xbb\xbf", "utf-8", ""),
    (b"\xfe\xff", "utf-16-be", "decoded as UTF-16 (BOM)"),
    (b"\xff\xfe", "utf-16-le", "decoded as UTF-16 (BOM)"),
)

_ALLOWED_CONTROLS = frozenset("\t\n\r\f\v")


def _looks_binary(text: str) -> bool:
    """True when the first 8 KiB of decoded text is mostly not text.

    Control characters (NUL included) above 10% mean binary; so does a sample that is
    largely replacement characters plus controls (random bytes decoded as UTF-8).
    """
    sample = text[:_BINARY_SAMPLE_CHARS]
    if not sample:
        return False
    controls = sum(1 for ch in sample if (ch < " " and ch not in _ALLOWED_CONTROLS) or ch == "\x7f")
    replaced = sample.count("\ufffd")
    return controls / len(sample) > 0.10 or (controls + replaced) / len(sample) > 0.30


def decode_bytes(data: bytes) -> tuple[str, list[str]]:
    """Decode raw document bytes to text, returning ``(text, warnings)``.

    BOMs (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE) are honoured and stripped; without a BOM the
    bytes must be UTF-8, and invalid sequences are replaced with U+FFFD plus the warning
    ``"invalid UTF-8 replaced"``. NUL characters are removed with the warning
    ``"NUL bytes removed"``. Line endings are not touched here.

    Raises:
        CleaningError: the bytes look binary (many control characters or NULs in the first
            8 KiB after a non-UTF-16/32 decode), or a BOM-declared encoding cannot decode them.
    """
    warnings: list[str] = []
    for bom, encoding, note in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom) :].decode(encoding)
            except UnicodeDecodeError as exc:
                raise CleaningError(f"bytes with a {encoding} BOM do not decode as {encoding}: {exc}") from exc
            if note:
                warnings.append(note)
            wide = encoding.startswith(("utf-16", "utf-32"))
            break
    else:
        wide = False
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            warnings.append("invalid UTF-8 replaced")
    # UTF-16/32 text legitimately decodes from bytes full of NULs; judge only byte-oriented decodes.
    if not wide and _looks_binary(text):
        raise CleaningError("binary content: too many control characters or NUL bytes in the first 8 KiB")
    if "\x00" in text:
        text = text.replace("\x00", "")
        warnings.append("NUL bytes removed")
    return text, warnings


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


def normalize_typography(text: str) -> str:
    """Normalize typography while keeping line structure.

    NFKC; curly quotes -> ``'`` / ``"``; en/em dashes and minus -> ``-``; non-breaking and
    thin spaces -> space; zero-width characters, bidi marks and soft hyphens removed; other
    control characters removed; ``\\r\\n``/``\\r`` -> ``\\n``; runs of spaces and tabs collapsed
    to one space. Newlines are kept (callers decide about paragraphs and blocks).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFKC", text)
    text = text.translate(_TYPOGRAPHY_TABLE)
    text = _CONTROL_CHARS.sub("", text)
    return _HORIZONTAL_SPACE.sub(" ", text)


def detect_language(text: str) -> str:
    """ISO 639-1 code of ``text`` from langdetect (deterministic, seed 0), else ``"unknown"``.

    Only the first ~3000 characters are examined. Returns ``"unknown"`` when the text has
    fewer than 20 letters or langdetect fails. Region suffixes are dropped (``zh-cn`` -> ``zh``).
    """
    sample = text[:_LANGUAGE_SAMPLE_CHARS]
    if sum(1 for ch in sample if ch.isalpha()) < _MIN_LETTERS_FOR_LANGUAGE:
        return "unknown"
    try:
        code = detect(sample)
    except LangDetectException:
        return "unknown"
    return code.split("-")[0].lower() or "unknown"


# ---------------------------------------------------------------------------------------------
# Assembly shared by every format
# ---------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


@dataclass
class _RawBlock:
    """A block before normalization: ``level`` > 0 for headings; ``preformatted`` keeps lines."""

    text: str
    level: int = 0
    preformatted: bool = False


def _block_text(raw: _RawBlock) -> str:
    text = normalize_typography(raw.text)
    if raw.preformatted:
        # Code keeps its lines, but never a blank line: "\n\n" is the block separator.
        lines = (line.strip() for line in text.split("\n"))
        return "\n".join(line for line in lines if line)
    return _WHITESPACE.sub(" ", text).strip()


def _assemble(raw_blocks: list[_RawBlock], title: str | None, warnings: list[str], source: str) -> CleanedDocument:
    """Normalize raw blocks, drop empty ones, compute heading paths and offsets."""
    texts: list[str] = []
    blocks: list[Block] = []
    heading_stack: list[tuple[int, str]] = []
    offset = 0
    first_h1: str | None = None
    first_heading: str | None = None
    for raw in raw_blocks:
        text = _block_text(raw)
        if not text:
            continue
        if raw.level > 0:
            level = min(raw.level, 6)
            while heading_stack and heading_stack[-1][0] >= level:
                heading_stack.pop()
            path = tuple(t for _, t in heading_stack)
            heading_stack.append((level, text))
            kind = "heading"
            first_heading = first_heading or text
            if level == 1:
                first_h1 = first_h1 or text
        else:
            level = 0
            path = tuple(t for _, t in heading_stack)
            kind = "text"
        if texts:
            offset += 2
        blocks.append(Block(kind=kind, start=offset, end=offset + len(text), level=level, heading_path=path))
        texts.append(text)
        offset += len(text)
    if not blocks:
        raise CleaningError(f"no text after cleaning ({source})")
    doc_text = "\n\n".join(texts)
    if title is not None:
        title = _WHITESPACE.sub(" ", normalize_typography(title)).strip() or None
    return CleanedDocument(
        text=doc_text,
        blocks=tuple(blocks),
        title=title or first_h1 or first_heading,
        language=detect_language(doc_text),
        warnings=tuple(warnings),
    )


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_DROPPED_TAGS = (
    "script", "style", "noscript", "template", "nav", "header", "footer", "aside",
    "form", "svg", "iframe", "head", "button", "select", "object", "embed", "canvas",
)  # fmt: skip
# Sphinx and common site chrome that is not content.
_DROPPED_CLASSES = frozenset({"headerlink", "sphinxsidebar", "sphinxsidebarwrapper", "related"})
_HEADING_TAGS = {f"h{i}": i for i in range(1, 7)}
_BLOCK_TAGS = frozenset(
    """address article blockquote body caption center dd details dialog dir div dl dt fieldset
    figcaption figure h1 h2 h3 h4 h5 h6 hgroup hr html legend li main menu ol p pre section
    summary table tbody thead tfoot tr ul""".split()
)
_CELL_TAGS = frozenset({"td", "th"})
_SKIPPED_STRINGS = (PreformattedString, Script, Stylesheet, TemplateString)


def _drop_boilerplate(soup: BeautifulSoup) -> None:
    """Remove elements that are never content (scripts, navigation, hidden parts, Sphinx chrome)."""
    # A <header> inside an article or <main> holds the article's own title, not site chrome.
    doomed: list[Tag] = [
        tag
        for tag in soup.find_all(_DROPPED_TAGS)
        if not (tag.name == "header" and tag.find_parent(("article", "main")) is not None)
    ]
    for tag in soup.find_all(True):
        attrs = tag.attrs or {}
        if (
            str(attrs.get("role", "")).lower() == "navigation"
            or str(attrs.get("aria-hidden", "")).lower() == "true"
            or "hidden" in attrs
            or _DROPPED_CLASSES.intersection(tag.get("class") or ())
        ):
            doomed.append(tag)
    for tag in doomed:
        # An ancestor may already have been decomposed, taking this tag with it.
        if not tag.decomposed:
            tag.decompose()


def _main_content(soup: BeautifulSoup) -> Tag:
    """The main content element if the page marks one (role=main, <main>, Sphinx div.body), else the page."""
    for found in (
        soup.find(attrs={"role": "main"}),
        soup.find("main"),
        soup.find("div", class_="body"),
    ):
        if isinstance(found, Tag):
            return found
    return soup.body or soup


class _HtmlBlockCollector:
    """Turns an element tree into raw blocks with an explicit stack (no recursion).

    Text accumulates in a buffer that is flushed at every block-level boundary, so nested
    block elements never duplicate text and a div's own text between children still counts.
    """

    def __init__(self) -> None:
        self.blocks: list[_RawBlock] = []
        self._buffer: list[str] = []
        self._heading_level = 0
        self._pre_depth = 0
        self._cell_depth = 0
        self._row_cells: list[int] = []

    def _flush(self) -> None:
        text = "".join(self._buffer)
        self._buffer.clear()
        if text.strip():
            self.blocks.append(_RawBlock(text, level=self._heading_level, preformatted=self._pre_depth > 0))

    def _enter(self, tag: Tag) -> None:
        name = tag.name
        if name in _CELL_TAGS:
            if self._row_cells:
                if self._row_cells[-1] > 0:
                    self._buffer.append(" | ")
                self._row_cells[-1] += 1
            else:
                self._flush()
            self._cell_depth += 1
            return
        if name == "br":
            self._buffer.append("\n" if self._pre_depth else " ")
            return
        if name not in _BLOCK_TAGS:
            return
        if self._cell_depth:
            # Paragraphs inside a table cell stay part of the row.
            self._buffer.append(" ")
            return
        self._flush()
        if name in _HEADING_TAGS and not self._pre_depth:
            self._heading_level = _HEADING_TAGS[name]
        elif name == "pre":
            self._pre_depth += 1
        elif name == "tr":
            self._row_cells.append(0)

    def _exit(self, tag: Tag) -> None:
        name = tag.name
        if name in _CELL_TAGS:
            self._cell_depth = max(0, self._cell_depth - 1)
            if not self._row_cells:
                self._flush()
            return
        if name not in _BLOCK_TAGS:
            return
        if self._cell_depth:
            self._buffer.append(" ")
            return
        self._flush()
        if name in _HEADING_TAGS and self._heading_level:
            self._heading_level = 0
        elif name == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)
        elif name == "tr" and self._row_cells:
            self._row_cells.pop()

    def collect(self, root: Tag) -> list[_RawBlock]:
        # Stack items: (node, entering). Children are pushed reversed to keep document order.
        stack: list[tuple[object, bool]] = [(root, True)]
        while stack:
            node, entering = stack.pop()
            if isinstance(node, Tag):
                if entering:
                    self._enter(node)
                    stack.append((node, False))
                    stack.extend((child, True) for child in reversed(node.contents))
                else:
                    self._exit(node)
            elif isinstance(node, NavigableString) and not isinstance(node, _SKIPPED_STRINGS):
                self._buffer.append(str(node))
        self._flush()
        return self.blocks


def _decode_html(data: bytes) -> tuple[str, list[str]]:
    """Decode HTML bytes, honouring a declared ``<meta charset>`` when the bytes are not UTF-8."""
    text, warnings = decode_bytes(data)
    if "invalid UTF-8 replaced" in warnings:
        declared = EncodingDetector.find_declared_encoding(data[:4096], is_html=True)
        if declared and declared.lower().replace("_", "-") not in ("utf-8", "utf8"):
            try:
                text = data.decode(declared).replace("\x00", "")
            except (LookupError, UnicodeDecodeError):
                return text, warnings
            warnings = [w for w in warnings if w != "invalid UTF-8 replaced"] + [f"decoded as declared {declared}"]
    return text, warnings


def _clean_html(data: bytes, source: str) -> CleanedDocument:
    text, warnings = _decode_html(data)
    soup = BeautifulSoup(text, "lxml")
    title_tag = soup.find("title")
    title = title_tag.get_text(" ") if isinstance(title_tag, Tag) else None
    _drop_boilerplate(soup)
    raw_blocks = _HtmlBlockCollector().collect(_main_content(soup))
    return _assemble(raw_blocks, title, warnings, source)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

_MD_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_MD_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_MD_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_MD_THEMATIC = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_MD_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$")
_MD_TASK = re.compile(r"^\[[ xX]\][ \t]+")
_MD_BLOCKQUOTE = re.compile(r"^ {0,3}>[ ]?")
_MD_TABLE_DELIMITER = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
_MD_LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*\S+.*$")
_MD_INDENTED_CODE = re.compile(r"^(?: {4}|\t)")

_MD_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_MD_IMAGE = re.compile(r"!\[[^\]]*\](?:\([^)]*\)|\[[^\]]*\])")
_MD_LINK = re.compile(r"\[([^\]]*)\](?:\([^)]*\)|\[[^\]]*\])")
_MD_AUTOLINK = re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_MD_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_MD_EMPHASIS_STAR = re.compile(r"\*(?=\S)(.+?)(?<=\S)\*")
_MD_EMPHASIS_UNDERSCORE = re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)")
_MD_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


_ESCAPE_BASE = 0xE000  # escaped punctuation parks in the Private Use Area while markup is removed


def _markdown_inline_plain(text: str) -> str:
    text = _MD_ESCAPE.sub(lambda m: chr(_ESCAPE_BASE + ord(m.group(1))), text)
    text = _MD_IMAGE.sub("", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_AUTOLINK.sub(r"\1", text)
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_TAG.sub("", text)
    text = _MD_STRONG.sub(r"\2", text)
    text = _MD_EMPHASIS_STAR.sub(r"\1", text)
    text = _MD_EMPHASIS_UNDERSCORE.sub(r"\1", text)
    text = _MD_STRIKE.sub(r"\1", text)
    text = re.sub("[\ue000-\ue07f]", lambda m: chr(ord(m.group(0)) - _ESCAPE_BASE), text)
    return html.unescape(text)


def _markdown_inline(text: str) -> str:
    """Strip inline Markdown markup; inline code keeps its content verbatim."""
    parts: list[str] = []
    position = 0
    for match in _MD_CODE_SPAN.finditer(text):
        parts.append(_markdown_inline_plain(text[position : match.start()]))
        parts.append(match.group(2).strip())
        position = match.end()
    parts.append(_markdown_inline_plain(text[position:]))
    return "".join(parts)


def _split_table_row(line: str) -> list[str]:
    row = line.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    cells = re.split(r"(?<!\\)\|", row)
    return [_markdown_inline(cell.replace("\\|", "|")).strip() for cell in cells]


def _strip_front_matter(lines: list[str]) -> tuple[list[str], str | None]:
    """Drop a leading YAML front matter block; return its ``title:`` if it has one."""
    if not lines or lines[0].strip() != "---":
        return lines, None
    for index in range(1, len(lines)):
        if lines[index].strip() in ("---", "..."):
            title = None
            for line in lines[1:index]:
                match = re.match(r"^title:\s*(.+?)\s*$", line)
                if match:
                    title = match.group(1).strip("'\"")
            return lines[index + 1 :], title
    return lines, None


def _parse_markdown(text: str) -> tuple[list[_RawBlock], str | None]:
    lines, title = _strip_front_matter(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    blocks: list[_RawBlock] = []
    paragraph: list[str] = []
    paragraph_is_list_item = False

    def flush() -> None:
        nonlocal paragraph_is_list_item
        if paragraph:
            blocks.append(_RawBlock(_markdown_inline(" ".join(paragraph))))
            paragraph.clear()
        paragraph_is_list_item = False

    index = 0
    in_comment = False
    while index < len(lines):
        line = lines[index]
        index += 1
        if in_comment:
            if "-->" in line:
                in_comment = False
                line = line.split("-->", 1)[1]
            else:
                continue
        while _MD_BLOCKQUOTE.match(line):
            line = _MD_BLOCKQUOTE.sub("", line, count=1)
        fence = _MD_FENCE.match(line)
        if fence:
            flush()
            marker = fence.group(1)
            code: list[str] = []
            while index < len(lines):
                candidate = _MD_BLOCKQUOTE.sub("", lines[index])
                index += 1
                stripped = candidate.strip()
                if stripped.startswith(marker[0] * len(marker)) and not stripped.strip(marker[0]):
                    break
                code.append(candidate)
            blocks.append(_RawBlock("\n".join(code), preformatted=True))
            continue
        if "<!--" in line and "-->" not in line.split("<!--", 1)[1]:
            in_comment = True
            line = line.split("<!--", 1)[0]
        if not line.strip():
            flush()
            continue
        atx = _MD_ATX.match(line)
        if atx:
            flush()
            blocks.append(_RawBlock(_markdown_inline(atx.group(2) or ""), level=len(atx.group(1))))
            continue
        setext = _MD_SETEXT.match(line)
        if setext and paragraph and not paragraph_is_list_item:
            blocks.append(_RawBlock(_markdown_inline(" ".join(paragraph)), level=1 if setext.group(1)[0] == "=" else 2))
            paragraph.clear()
            continue
        if _MD_THEMATIC.match(line):
            flush()
            continue
        if _MD_LINK_DEFINITION.match(line) and not paragraph:
            continue
        if "|" in line and index < len(lines) and _MD_TABLE_DELIMITER.match(lines[index]) and "-" in lines[index]:
            flush()
            blocks.append(_RawBlock(" | ".join(_split_table_row(line))))
            index += 1
            while index < len(lines) and "|" in lines[index] and lines[index].strip():
                blocks.append(_RawBlock(" | ".join(_split_table_row(lines[index]))))
                index += 1
            continue
        if not paragraph and _MD_INDENTED_CODE.match(line) and not _MD_LIST_ITEM.match(line):
            code = [line]
            while index < len(lines) and (_MD_INDENTED_CODE.match(lines[index]) or not lines[index].strip()):
                code.append(lines[index])
                index += 1
            blocks.append(_RawBlock("\n".join(code), preformatted=True))
            continue
        item = _MD_LIST_ITEM.match(line)
        if item:
            flush()
            paragraph.append(_MD_TASK.sub("", item.group(1) or ""))
            paragraph_is_list_item = True
            continue
        paragraph.append(line.strip())
    flush()
    return blocks, title


# ---------------------------------------------------------------------------------------------
# reStructuredText
# ---------------------------------------------------------------------------------------------

_RST_ADORNMENT = re.compile(r"^([=\-`:'\"~^_*+#<>.!$%&(),/;?@\[\]\\{|}])\1+[ \t]*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:\|[^|]+\|\s+)?([\w:.+-]+)::(.*)$")
_RST_EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s|$)(.*)$")
_RST_FOOTNOTE = re.compile(r"^\s*\.\.\s+\[([^\]]+)\]\s+(.*)$")
_RST_FIELD = re.compile(r"^\s*:([^:\s][^:]*):(?:\s+(.*))?$")
_RST_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\(?(?:\d+|#)[.)])\s+(.*)$")
_RST_LINE_BLOCK = re.compile(r"^\s*\|\s+(.*)$")
# Directives whose body is not prose: drop the body with the directive line.
_RST_SILENT_DIRECTIVES = frozenset(
    {"toctree", "image", "figure", "include", "raw", "meta", "contents", "index", "highlight",
     "sectnum", "literalinclude", "automodule", "autoclass", "autofunction", "currentmodule", "module"}
)  # fmt: skip

_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_ROLE = re.compile(r":[\w:+.-]+:`([^`]+)`")
_RST_ROLE_AFTER = re.compile(r"`([^`]+)`:[\w:+.-]+:")
_RST_REFERENCE = re.compile(r"`([^`]+)`__?")
_RST_INTERPRETED = re.compile(r"`([^`]+)`")
_RST_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_RST_EMPHASIS = re.compile(r"\*(?=\S)(.+?)(?<=\S)\*")
_RST_FOOTNOTE_REF = re.compile(r"\s?\[(?:\d+|#[\w-]*|\*|[\w-]+)\]_")
_RST_SUBSTITUTION = re.compile(r"\|([^|\s][^|]*)\|_{0,2}")
_RST_NAMED_REF = re.compile(r"\b([A-Za-z0-9]+)__?(?=[\s.,;:!?)]|$)")


def _rst_title(content: str) -> str:
    """Display text of an interpreted/role target: ``Title <target>`` -> Title, ``~a.b.c`` -> c."""
    content = content.strip()
    explicit = re.match(r"^(.*?)\s*<[^<>]+>$", content, re.DOTALL)
    if explicit and explicit.group(1):
        return explicit.group(1)
    if content.startswith("~"):
        return content[1:].rsplit(".", 1)[-1]
    return content.lstrip("!")


def _rst_inline_plain(text: str) -> str:
    text = _RST_ROLE.sub(lambda m: _rst_title(m.group(1)), text)
    text = _RST_ROLE_AFTER.sub(lambda m: _rst_title(m.group(1)), text)
    text = _RST_REFERENCE.sub(lambda m: _rst_title(m.group(1)), text)
    text = _RST_INTERPRETED.sub(lambda m: _rst_title(m.group(1)), text)
    text = _RST_STRONG.sub(r"\1", text)
    text = _RST_EMPHASIS.sub(r"\1", text)
    text = _RST_FOOTNOTE_REF.sub("", text)
    text = _RST_SUBSTITUTION.sub(r"\1", text)
    text = _RST_NAMED_REF.sub(r"\1", text)
    return text.replace("\\", "")


def _rst_inline(text: str) -> str:
    """Strip inline reST markup; ``literal`` keeps its content verbatim."""
    parts: list[str] = []
    position = 0
    for match in _RST_LITERAL.finditer(text):
        parts.append(_rst_inline_plain(text[position : match.start()]))
        parts.append(match.group(1))
        position = match.end()
    parts.append(_rst_inline_plain(text[position:]))
    return "".join(parts)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _parse_rst(text: str) -> list[_RawBlock]:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8).split("\n")
    blocks: list[_RawBlock] = []
    paragraph: list[str] = []
    styles: list[tuple[str, bool]] = []  # adornment styles in order of first appearance
    literal_pending = False

    def heading_level(char: str, overline: bool) -> int:
        if (char, overline) not in styles:
            styles.append((char, overline))
        return styles.index((char, overline)) + 1

    def flush() -> None:
        nonlocal literal_pending
        if paragraph:
            joined = " ".join(paragraph)
            # "Paragraph::" introduces a literal block; docutils shows a single colon (or none).
            if joined.rstrip().endswith("::"):
                literal_pending = True
                stripped = joined.rstrip()[:-2]
                joined = stripped if (not stripped or stripped[-1].isspace()) else stripped + ":"
            blocks.append(_RawBlock(_rst_inline(joined)))
            paragraph.clear()

    def skip_indented(index: int, base_indent: int) -> int:
        """Index of the first line after the body indented deeper than ``base_indent``."""
        while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > base_indent):
            index += 1
        return index

    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if not stripped:
            flush()
            index += 1
            continue
        if literal_pending and not paragraph:
            literal_pending = False
            if _indent(line) > 0:
                end = skip_indented(index, 0)
                blocks.append(_RawBlock("\n".join(lines[index:end]), preformatted=True))
                index = end
                continue
        nxt = lines[index + 1] if index + 1 < len(lines) else ""
        after = lines[index + 2] if index + 2 < len(lines) else ""
        adornment = _RST_ADORNMENT.match(line)
        # Overlined title: adornment, title, same adornment.
        if (
            adornment
            and not paragraph
            and nxt.strip()
            and _RST_ADORNMENT.match(after)
            and after.strip() == stripped
        ):
            blocks.append(_RawBlock(_rst_inline(nxt.strip()), level=heading_level(stripped[0], True)))
            index += 3
            continue
        # Underlined title: one unindented text line, then an adornment as long as the title
        # (docutils reads a shorter underline of under 4 characters as ordinary text).
        underline = _RST_ADORNMENT.match(nxt)
        if (
            not paragraph
            and not adornment
            and _indent(line) == 0
            and underline
            and len(nxt.strip()) >= min(len(stripped), 4)
            and not _RST_EXPLICIT.match(line)
        ):
            blocks.append(_RawBlock(_rst_inline(stripped), level=heading_level(nxt.strip()[0], False)))
            index += 2
            continue
        if adornment and not paragraph and len(stripped) >= 4:
            index += 1  # a transition line
            continue
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            flush()
            base = _indent(line)
            name = directive.group(2).split(":")[-1].lower()
            index += 1
            if name in _RST_SILENT_DIRECTIVES:
                index = skip_indented(index, base)
                continue
            # Keep prose bodies (note, warning, code-block...) but drop the directive's option lines.
            while index < len(lines) and _RST_FIELD.match(lines[index]) and _indent(lines[index]) > base:
                index += 1
            if name in ("code-block", "code", "sourcecode", "doctest", "testcode"):
                end = skip_indented(index, base)
                blocks.append(_RawBlock("\n".join(lines[index:end]), preformatted=True))
                index = end
            elif directive.group(3).strip():
                # e.g. ".. note:: The first line" or ".. function:: name(args)".
                paragraph.append(directive.group(3).strip())
            continue
        footnote = _RST_FOOTNOTE.match(line)
        if footnote:
            flush()
            paragraph.append(footnote.group(2))
            index += 1
            continue
        explicit = _RST_EXPLICIT.match(line)
        if explicit:
            # Comments, hyperlink targets and substitution definitions are not content.
            flush()
            index = skip_indented(index + 1, _indent(line))
            continue
        if stripped == "::" and paragraph:
            paragraph.append("::")
            index += 1
            continue
        list_item = _RST_LIST_ITEM.match(line)
        field = _RST_FIELD.match(line)
        line_block = _RST_LINE_BLOCK.match(line)
        if list_item and (not paragraph or _indent(line) <= _indent(lines[index - 1])):
            flush()
            paragraph.append(list_item.group(1))
        elif field:
            flush()
            name, body = field.group(1), field.group(2) or ""
            paragraph.append(f"{name}: {body}".strip())
        elif line_block:
            flush()
            paragraph.append(line_block.group(1))
        else:
            paragraph.append(stripped)
        index += 1
    flush()
    return blocks


# ---------------------------------------------------------------------------------------------
# Plain text
# ---------------------------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")


def _parse_text(text: str) -> list[_RawBlock]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [_RawBlock(paragraph) for paragraph in _PARAGRAPH_BREAK.split(text)]


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def clean_document(data: bytes, suffix: str) -> CleanedDocument:
    """Clean one raw document.

    Args:
        data: the file's raw bytes.
        suffix: its file suffix (``".html"``, ``".md"``...), case-insensitive, with the dot.

    Returns:
        A ``CleanedDocument`` whose offsets invariant holds (see the module docstring).

    Raises:
        CleaningError: unsupported suffix, binary content, or no text after cleaning.
    """
    kind = suffix.lower()
    if kind not in SUPPORTED_SUFFIXES:
        raise CleaningError(f"unsupported suffix {suffix!r}: expected one of {sorted(SUPPORTED_SUFFIXES)}")
    source = f"{kind} document of {len(data)} bytes"
    if kind in (".html", ".htm"):
        return _clean_html(data, source)
    text, warnings = decode_bytes(data)
    if kind in (".md", ".markdown"):
        raw_blocks, title = _parse_markdown(text)
        return _assemble(raw_blocks, title, warnings, source)
    if kind == ".rst":
        return _assemble(_parse_rst(text), None, warnings, source)
    return _assemble(_parse_text(text), None, warnings, source)


def cleaning_fingerprint() -> str:
    """Fingerprint of everything that changes cleaned output (bump ``CLEANER_VERSION`` on changes)."""
    return fingerprint(
        "cleaner",
        {
            "version": CLEANER_VERSION,
            "suffixes": sorted(SUPPORTED_SUFFIXES),
            "html_parser": "lxml",
            "language_sample_chars": _LANGUAGE_SAMPLE_CHARS,
        },
    )
