"""The format registry: one module per document format, each turning bytes into raw blocks.

Every format module defines ``NAME``, ``SUFFIXES``, ``VERSION`` (bump it when its output changes),
``LIMITS`` (one line for the README) and ``parse(data: bytes) -> Parsed``; ``base.assemble`` turns
its raw blocks into the ``CleanedDocument`` every format shares (text, blocks with heading paths,
character offsets and pages). The supported suffixes are the registry's, and each format's version
enters the cleaning fingerprint of its own documents only, so changing or adding one format re-cleans
only documents of that format.

Adding a format: write ``<name>.py`` with the four names and ``parse``, add it to ``FORMATS``, add
tests that double adversarial inputs (``tests/test_formats_linear.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from embedding_assets.core.formats import docx, html, markdown, pdf, rst, text
from embedding_assets.core.formats.base import Block, CleanedDocument, CleaningError, Parsed, RawBlock, assemble


@dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]
    version: str
    limits: str
    parse: Callable[[bytes], Parsed]


def _format(module: ModuleType) -> Format:
    return Format(module.NAME, module.SUFFIXES, module.VERSION, module.LIMITS, module.parse)


FORMATS: tuple[Format, ...] = tuple(_format(m) for m in (html, markdown, rst, text, pdf, docx))
_BY_SUFFIX: dict[str, Format] = {suffix: f for f in FORMATS for suffix in f.suffixes}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_BY_SUFFIX)


def format_for(suffix: str) -> Format:
    """The format of a file suffix (``".md"``, case-insensitive, with the dot).

    Raises:
        CleaningError: the suffix is not supported (the message lists those that are).
    """
    found = _BY_SUFFIX.get(suffix.lower())
    if found is None:
        raise CleaningError(f"unsupported suffix {suffix!r}: expected one of {sorted(SUPPORTED_SUFFIXES)}")
    return found


__all__ = [
    "FORMATS", "SUPPORTED_SUFFIXES", "Block", "CleanedDocument", "CleaningError", "Format", "Parsed",
    "RawBlock", "assemble", "format_for",
]  # fmt: skip
