"""HTML: the main content of a page, without boilerplate, as headings, paragraphs, list items,
table rows and preformatted blocks.

Parsed by lexbor (selectolax), an HTML5 parser in C; the element tree is walked with an explicit
stack, so depth never recurses and each node is visited twice (enter, exit): linear in the page size.

HTML5 tree construction checks element scopes by walking the stack of open elements, so a page
nesting tens of thousands of unclosed elements costs time quadratic in its depth in every HTML5
parser (browsers cap the depth). A linear pre-scan bounds the possible depth (start tags minus end
tags, ``MAX_TREE_DEPTH``); a deeper page is read by a flat tag scanner instead, with the same block,
heading, table and dropped-element rules but without main-content detection (warning
``"nesting too deep for a tree; read flat"``).

Rules (as before the registry): ``script``, ``style``, ``nav``, ``header`` (except inside ``article``
or ``main``), ``footer``, ``aside``, ``form`` and other non-content elements, anything with
``role="navigation"``, ``aria-hidden="true"`` or ``hidden``, and Sphinx chrome (``headerlink``,
``sphinxsidebar``, ``related``) are dropped; the main content is ``[role=main]``, else ``<main>``,
else Sphinx's ``div.body``, else ``<body>``. Table cells of a row are joined with `` | ``.
"""

from __future__ import annotations

import html as html_entities
import re

import numpy as np

from selectolax.lexbor import LexborHTMLParser, LexborNode

from embedding_assets.core.formats.base import Parsed, RawBlock
from embedding_assets.core.formats.decode import decode_html

NAME = "html"
SUFFIXES = (".html", ".htm")
VERSION = "2"  # 2: lexbor instead of BeautifulSoup + lxml
LIMITS = "main content only (navigation, headers, footers, sidebars and scripts dropped); tables as one line per row"

_DROPPED_TAGS = (
    "script", "style", "noscript", "template", "nav", "header", "footer", "aside",
    "form", "svg", "iframe", "head", "button", "select", "object", "embed", "canvas",
)  # fmt: skip
# Sphinx and common site chrome that is not content.
_DROPPED_CLASSES = frozenset({"headerlink", "sphinxsidebar", "related"})
_HEADING_TAGS = {f"h{i}": i for i in range(1, 7)}
_BLOCK_TAGS = frozenset(
    """address article blockquote body caption center dd details dialog dir div dl dt fieldset
    figcaption figure h1 h2 h3 h4 h5 h6 hgroup hr html legend li main menu ol p pre section
    summary table tbody thead tfoot tr ul""".split()
)
_CELL_TAGS = frozenset({"td", "th"})
_VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
MAX_TREE_DEPTH = 1024
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9:-]*)[^<>]*>?")
_RAW_TEXT_TAGS = frozenset({"script", "style", "template", "textarea", "title", "xmp", "noscript", "iframe"})


def _possible_depth(text: str) -> int:
    """An upper bound of how deep a tree of this page can get: the most start tags (void elements
    aside) not yet matched by end tags at any point of the page, an end tag never taking it below 0.

    Vectorized over the UTF-8 bytes with numpy (every ``<`` classified at once, then a prefix sum),
    so it costs a few C passes over the page, not a Python step per tag.
    """
    raw = np.frombuffer(text.encode("utf-8", "surrogatepass") + b"\0\0\0\0\0\0\0", dtype=np.uint8)
    at = np.flatnonzero(raw[:-7] == 0x3C)  # every "<"
    if len(at) <= MAX_TREE_DEPTH:
        return len(at)
    lower = raw | 0x20  # ASCII letters folded to lower case (other bytes are never letters below)
    first = lower[at + 1]
    is_start = (first >= 0x61) & (first <= 0x7A)
    second = lower[at + 2]
    is_end = (raw[at + 1] == 0x2F) & (second >= 0x61) & (second <= 0x7A)
    for name in _VOID_TAGS:  # a void start tag: "<" + name + a byte that cannot continue a name
        match = is_start.copy()
        for offset, char in enumerate(name.encode(), start=1):
            match &= lower[at + offset] == char
        follow = lower[at + len(name) + 1]
        match &= ~(((follow >= 0x61) & (follow <= 0x7A)) | ((follow >= 0x30) & (follow <= 0x39)) | (follow == 0x2D) | (follow == 0x3A))
        is_start &= ~match
    steps = is_start.astype(np.int64) - is_end.astype(np.int64)
    depth = np.cumsum(steps)
    floor = np.minimum(np.minimum.accumulate(depth), 0)  # the walk reflected at 0: stray end tags do not count
    return int((depth - floor).max())


def _boilerplate(tree: LexborHTMLParser) -> set[int]:
    """Ids (``mem_id``) of the elements that are never content; the walk skips their subtrees.

    The selectors run in C and only their matches reach Python, so this is linear in the page
    plus the matches (nothing walks up the tree per match).
    """
    doomed = {node.mem_id for node in tree.css(", ".join(t for t in _DROPPED_TAGS if t != "header"))}
    # A <header> inside an article or <main> holds the article's own title, not site chrome.
    kept_headers = {node.mem_id for node in tree.css("article header, main header")}
    doomed.update(node.mem_id for node in tree.css("header") if node.mem_id not in kept_headers)
    selector = "[role], [aria-hidden], [hidden], " + ", ".join(f".{name}" for name in _DROPPED_CLASSES)
    for node in tree.css(selector):
        attrs = node.attributes
        if (
            (attrs.get("role") or "").strip().lower() == "navigation"
            or (attrs.get("aria-hidden") or "").strip().lower() == "true"
            or "hidden" in attrs
            or not _DROPPED_CLASSES.isdisjoint((attrs.get("class") or "").split())
        ):
            doomed.add(node.mem_id)
    return doomed


def _inside(node: LexborNode, doomed: set[int]) -> bool:
    while node is not None:
        if node.mem_id in doomed:
            return True
        node = node.parent
    return False


def _main_content(tree: LexborHTMLParser, doomed: set[int]) -> LexborNode | None:
    """``[role=main]``, else ``<main>``, else ``div.body``, else the body: the first of each kind that
    is not itself boilerplate (only the first few candidates are checked, to stay linear)."""
    for selector in ('[role="main"]', "main", "div.body"):
        for candidate in tree.css(selector)[:3]:
            if not _inside(candidate, doomed):
                return candidate
    return tree.body or tree.root


class _BlockCollector:
    """Turns an element tree into raw blocks.

    Text accumulates in a buffer that is flushed at every block-level boundary, so nested
    block elements never duplicate text and a div's own text between children still counts.
    """

    def __init__(self) -> None:
        self.blocks: list[RawBlock] = []
        self._buffer: list[str] = []
        self._heading_level = 0
        self._pre_depth = 0
        self._cell_depth = 0
        self._row_cells: list[int] = []

    def _flush(self) -> None:
        text = "".join(self._buffer)
        self._buffer.clear()
        if text.strip():
            self.blocks.append(RawBlock(text, level=self._heading_level, preformatted=self._pre_depth > 0))

    def _enter(self, name: str) -> None:
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
            self._buffer.append(" ")  # paragraphs inside a table cell stay part of the row
            return
        self._flush()
        if name in _HEADING_TAGS and not self._pre_depth:
            self._heading_level = _HEADING_TAGS[name]
        elif name == "pre":
            self._pre_depth += 1
        elif name == "tr":
            self._row_cells.append(0)

    def _exit(self, name: str) -> None:
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

    def collect(self, root: LexborNode, skipped: set[int]) -> list[RawBlock]:
        # Stack items: (node, entering) or (tag name, exiting). Children are pushed reversed.
        stack: list[tuple[object, bool]] = [(root, True)]
        append_text = self._buffer.append
        while stack:
            item, entering = stack.pop()
            if not entering:
                self._exit(item)  # type: ignore[arg-type]
                continue
            node: LexborNode = item  # type: ignore[assignment]
            tag = node.tag
            if tag == "-text":
                append_text(node.text_content or "")
                continue
            if tag.startswith(("_", "!", "-")) or node.mem_id in skipped:
                continue  # comments, doctype, processing instructions; boilerplate
            self._enter(tag)
            stack.append((tag, False))
            children = list(node.iter(include_text=True))
            children.reverse()
            stack.extend((child, True) for child in children)
        self._flush()
        return self.blocks


_END_TAGS: dict[str, re.Pattern[str]] = {}


def _end_tag(name: str) -> re.Pattern[str]:
    if name not in _END_TAGS:
        _END_TAGS[name] = re.compile(f"</{re.escape(name)}", re.IGNORECASE)
    return _END_TAGS[name]


def _flat_blocks(text: str) -> list[RawBlock]:
    """Blocks of a page read as a flat stream of tags and text (no tree): linear in the page size.

    Dropped elements (scripts, navigation...) are skipped up to their end tag; block, heading, cell
    and ``pre`` tags drive the same collector as the tree walk.
    """
    collector = _BlockCollector()
    position, end = 0, len(text)
    while position < end:
        start = text.find("<", position)
        if start < 0:
            collector._buffer.append(html_entities.unescape(text[position:]))
            break
        if start > position:
            collector._buffer.append(html_entities.unescape(text[position:start]))
        if text.startswith("<!--", start):
            close = text.find("-->", start + 4)
            position = end if close < 0 else close + 3
            continue
        match = _TAG.match(text, start)
        if match is None:
            collector._buffer.append("<")
            position = start + 1
            continue
        position = match.end()
        name = match.group(2).lower()
        if match.group(1):
            collector._exit(name)
        elif name in _DROPPED_TAGS or name in _RAW_TEXT_TAGS:
            close = _end_tag(name).search(text, position)
            position = end if close is None else close.start()
        else:
            collector._enter(name)
            if name in _VOID_TAGS:
                collector._exit(name)
    collector._flush()
    return collector.blocks


def parse(data: bytes) -> Parsed:
    text, warnings = decode_html(data)
    if _possible_depth(text) > MAX_TREE_DEPTH:
        title = None
        match = re.search(r"<title[^<>]*>([^<]*)", text[:65536], re.IGNORECASE)
        if match:
            title = html_entities.unescape(match.group(1))
        return Parsed(_flat_blocks(text), title, [*warnings, "nesting too deep for a tree; read flat"])
    tree = LexborHTMLParser(text)
    title_node = tree.css_first("title")
    title = title_node.text(separator=" ") if title_node is not None else None
    doomed = _boilerplate(tree)
    root = _main_content(tree, doomed)
    blocks = _BlockCollector().collect(root, doomed) if root is not None else []
    return Parsed(blocks, title, warnings)


def fragment_blocks(markup: str) -> list[RawBlock]:
    """Raw blocks of an HTML fragment embedded in another format (a Markdown HTML block), by the same rules."""
    if _possible_depth(markup) > MAX_TREE_DEPTH:
        return _flat_blocks(markup)
    tree = LexborHTMLParser(markup)
    root = tree.body or tree.root
    return _BlockCollector().collect(root, _boilerplate(tree)) if root is not None else []
