"""PDF: the text layer of each page (pypdf), with the page number carried into every block.

Paragraphs are the page's blank-line-separated runs of lines; the document outline (bookmarks), when
there is one, becomes headings placed where their title first appears on their page (else at the top
of the page), so PDF chunks get heading paths as well as pages. Words split by a hyphen at a line end
are joined. The metadata title, when set, is the title.

Refused with a reason (``CleaningError``): encrypted files that need a password, files with no text
layer (scanned pages: OCR them first), and files pypdf cannot read.
"""

from __future__ import annotations

import io
import logging
import re

from embedding_assets.core.formats.base import CleaningError, Parsed, RawBlock

NAME = "pdf"
SUFFIXES = (".pdf",)
VERSION = "1"
LIMITS = "text layer only (scanned pages need OCR first); encrypted files refused; headings from the outline; pages kept"

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
_HYPHENATED = re.compile(r"(\w)-\n(?=[a-z])")

# pypdf reports recoverable problems of a file through logging; they are the file's, not ours.
logging.getLogger("pypdf").setLevel(logging.ERROR)


def _outline_headings(reader) -> dict[int, list[tuple[int, str]]]:
    """0-based page -> [(level, title)] in outline order; an unreadable outline gives none."""
    by_page: dict[int, list[tuple[int, str]]] = {}
    try:
        outline = reader.outline
    except Exception:  # noqa: BLE001 - a broken outline loses headings, never the text
        return by_page
    stack: list[tuple[list, int]] = [(outline, 1)]
    # Iterative walk; nesting beyond 6 reads as level 6 (the assembler's deepest heading).
    pending: list[tuple[object, int]] = []
    while stack:
        items, level = stack.pop()
        for item in reversed(items):
            pending.append((item, level))
        while pending:
            item, level = pending.pop()
            if isinstance(item, list):
                stack.append((item, min(level + 1, 6)))
                break
            try:
                page = reader.get_destination_page_number(item)
                title = str(item.title or "").strip()
            except Exception:  # noqa: BLE001, S112 - one broken outline entry must not lose the others' headings
                continue
            if page is not None and page >= 0 and title:
                by_page.setdefault(page, []).append((level, title))
    return by_page


def _page_blocks(text: str, page: int, headings: list[tuple[int, str]]) -> list[RawBlock]:
    text = _HYPHENATED.sub(r"\1", text.replace("\r\n", "\n").replace("\r", "\n"))
    blocks: list[RawBlock] = []
    position = 0
    for level, title in headings:
        found = text.find(title, position)
        if found < 0:
            blocks.append(RawBlock(title, level=level, page=page))
            continue
        blocks.extend(RawBlock(p, page=page) for p in _PARAGRAPH_BREAK.split(text[position:found]))
        blocks.append(RawBlock(title, level=level, page=page))
        position = found + len(title)
    blocks.extend(RawBlock(p, page=page) for p in _PARAGRAPH_BREAK.split(text[position:]))
    return blocks


def parse(data: bytes) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are encrypted with an empty user password (only printing/copying restricted).
            try:
                opened = reader.decrypt("")
            except (DependencyError, NotImplementedError) as exc:
                raise CleaningError(f"encrypted PDF with an unsupported cipher ({exc}); save it without encryption") from None
            if not opened:
                raise CleaningError("encrypted PDF: it needs a password; save a copy without one to index it")
        pages = reader.pages
        count = len(pages)
        headings = _outline_headings(reader)
        blocks: list[RawBlock] = []
        empty_pages = 0
        for index in range(count):
            text = pages[index].extract_text() or ""
            if not text.strip():
                empty_pages += 1
            blocks.extend(_page_blocks(text, index + 1, headings.get(index, [])))
        metadata = reader.metadata
        title = str(metadata.title) if metadata is not None and metadata.title else None
    except CleaningError:
        raise
    except FileNotDecryptedError:
        raise CleaningError("encrypted PDF: it needs a password; save a copy without one to index it") from None
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError) as exc:
        raise CleaningError(f"corrupt or unreadable PDF ({type(exc).__name__}: {exc}); re-save or repair it") from None
    if count and empty_pages == count:
        raise CleaningError(f"PDF has no text layer ({count} pages of images, e.g. a scan); run OCR on it first")
    warnings = [f"{empty_pages} of {count} PDF pages have no text layer"] if empty_pages else []
    return Parsed(blocks, title, warnings)
