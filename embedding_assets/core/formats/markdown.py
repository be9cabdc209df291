"""Markdown: CommonMark (plus GitHub tables and strikethrough) via markdown-it-py's token stream.

markdown-it-py is a port of markdown-it, the reference CommonMark implementation in JavaScript; its
block and inline rules are the spec's algorithms with the linear-time guards of the reference parser
(emphasis delimiters, link brackets, nesting limit). We read its flat token stream, never render HTML:
headings, paragraphs (one per list item), table rows (cells joined by `` | ``) and code blocks become
blocks; images and raw inline HTML are dropped; HTML blocks are read by the HTML cleaner's rules.
A leading YAML front matter block is skipped and its ``title:`` becomes the title.
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt
from markdown_it.token import Token

from embedding_assets.core.formats.base import Parsed, RawBlock
from embedding_assets.core.formats.decode import decode_bytes
from embedding_assets.core.formats.html import fragment_blocks

NAME = "markdown"
SUFFIXES = (".md", ".markdown")
VERSION = "2"  # 2: markdown-it-py instead of regular expressions
LIMITS = "CommonMark with GitHub tables and strikethrough; images dropped; front matter title read, the rest skipped"

_TASK = re.compile(r"^\[[ xX]\]\s+")
_FRONT_MATTER_TITLE = re.compile(r"^title:\s*(.+?)\s*$")


def _parser() -> MarkdownIt:
    # Links are not resolved or validated (nothing is rendered), so no linkify and no HTML sanitizing.
    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


_MD = _parser()


def _strip_front_matter(text: str) -> tuple[str, str | None]:
    """Drop a leading YAML front matter block (``---`` ... ``---``/``...``); return its ``title:``."""
    if not text.startswith("---"):
        return text, None
    lines = text.split("\n")
    if lines[0].strip() != "---":
        return text, None
    for index in range(1, len(lines)):
        if lines[index].strip() in ("---", "..."):
            title = None
            for line in lines[1:index]:
                match = _FRONT_MATTER_TITLE.match(line)
                if match:
                    title = match.group(1).strip("'\"")
            return "\n".join(lines[index + 1 :]), title
    return text, None


def _inline_text(token: Token) -> str:
    parts: list[str] = []
    for child in token.children or ():
        kind = child.type
        if kind == "text" or kind == "code_inline":
            parts.append(child.content)
        elif kind in ("softbreak", "hardbreak"):
            parts.append(" ")
        # images, inline HTML tags and the open/close markers of emphasis and links carry no text
    return "".join(parts)


def parse(data: bytes) -> Parsed:
    text, warnings = decode_bytes(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, title = _strip_front_matter(text)
    tokens = _MD.parse(text)
    blocks: list[RawBlock] = []
    heading_level = 0
    in_list_item = 0
    row: list[str] | None = None
    for token in tokens:
        kind = token.type
        if kind == "heading_open":
            heading_level = int(token.tag[1:])
        elif kind == "heading_close":
            heading_level = 0
        elif kind == "list_item_open":
            in_list_item += 1
        elif kind == "list_item_close":
            in_list_item -= 1
        elif kind == "tr_open":
            row = []
        elif kind == "tr_close":
            if row is not None:
                blocks.append(RawBlock(" | ".join(cell.strip() for cell in row)))
            row = None
        elif kind == "inline":
            content = _inline_text(token)
            if row is not None:
                row.append(content)
            elif heading_level:
                blocks.append(RawBlock(content, level=heading_level))
            else:
                if in_list_item:
                    content = _TASK.sub("", content)
                blocks.append(RawBlock(content))
        elif kind in ("fence", "code_block"):
            blocks.append(RawBlock(token.content, preformatted=True))
        elif kind == "html_block":
            blocks.extend(fragment_blocks(token.content))
    return Parsed(blocks, title, warnings)
