"""Plain text: paragraphs are separated by blank lines; no headings."""

from __future__ import annotations

import re

from embedding_assets.core.formats.base import Parsed, RawBlock
from embedding_assets.core.formats.decode import decode_bytes

NAME = "text"
SUFFIXES = (".txt",)
VERSION = "1"
LIMITS = "paragraphs split at blank lines; no headings"

# One linear pass: a newline, optional horizontal space, a newline, then any whitespace.
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")


def parse(data: bytes) -> Parsed:
    text, warnings = decode_bytes(data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return Parsed([RawBlock(paragraph) for paragraph in _PARAGRAPH_BREAK.split(text)], None, warnings)
