"""DOCX (Word 2007+): paragraphs and tables of the body in document order, via python-docx.

Paragraph styles ``Title`` and ``Heading 1``..``Heading 9`` (or any style with an outline level)
become headings, so chunks get heading paths; table rows become one block each with cells joined by
`` | `` (merged cells once). Headers, footers, comments and text boxes are not read. The core
properties' title, when set, is the title.

Refused with a reason (``CleaningError``): password-protected files (an OLE container, not a zip),
legacy ``.doc`` content, and files that are not a readable DOCX package.
"""

from __future__ import annotations

import io
import re
import zipfile

from embedding_assets.core.formats.base import CleaningError, Parsed, RawBlock

NAME = "docx"
SUFFIXES = (".docx",)
VERSION = "1"
LIMITS = "body paragraphs and tables; heading styles become headings; headers, footers and text boxes not read"

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_HEADING_STYLE = re.compile(r"^heading\s*([1-9])$", re.IGNORECASE)


def _style_levels(document) -> dict[str, int]:
    """Paragraph style id -> heading level (0 = not a heading), read once from styles.xml.

    Looking styles up per paragraph through python-docx searches the styles part every time; one
    pass keeps a file with many styles and many paragraphs linear.
    """
    from docx.enum.style import WD_STYLE_TYPE

    levels: dict[str, int] = {}
    for style in document.styles:
        if style.type != WD_STYLE_TYPE.PARAGRAPH:
            continue
        name = (style.name or "").strip()
        match = _HEADING_STYLE.match(name)
        level = 1 if name.lower() == "title" else int(match.group(1)) if match else 0
        if not level:
            outline = style.element.find(".//{http://schemas.openxmlformats.org/wordprocessingml/2006/main}outlineLvl")
            if outline is not None:
                value = outline.get("{http://schemas.openxmlformats.org/wordprocessingml/2006/main}val", "9")
                level = int(value) + 1 if value.isdigit() and int(value) < 9 else 0
        levels[style.style_id] = level
    return levels


def parse(data: bytes) -> Parsed:
    if data.startswith(_OLE_MAGIC):
        raise CleaningError(
            "password-protected or legacy Word file (an OLE container, not a DOCX package); save it as .docx without a password"
        )
    from docx import Document
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    try:
        document = Document(io.BytesIO(data))
        levels = _style_levels(document)
        blocks: list[RawBlock] = []
        for item in document.iter_inner_content():
            if isinstance(item, Paragraph):
                ppr = item._p.pPr
                style_id = ppr.pStyle.val if ppr is not None and ppr.pStyle is not None else None
                blocks.append(RawBlock(item.text, level=levels.get(style_id, 0) if style_id else 0))
            elif isinstance(item, Table):
                for row in item.rows:
                    cells: list[str] = []
                    kept: list[object] = []  # holds the elements so their ids stay unique
                    seen: set[int] = set()
                    for cell in row.cells:
                        if id(cell._tc) in seen:
                            continue  # a merged cell appears once per grid column it spans
                        seen.add(id(cell._tc))
                        kept.append(cell._tc)
                        cells.append(cell.text.strip())
                    blocks.append(RawBlock(" | ".join(cells)))
        title = document.core_properties.title or None
    except (zipfile.BadZipFile, PackageNotFoundError, KeyError, ValueError, AttributeError, TypeError, OSError) as exc:
        raise CleaningError(f"corrupt or unreadable DOCX ({type(exc).__name__}: {exc}); re-save it from Word") from None
    except Exception as exc:  # lxml's XMLSyntaxError and friends: a damaged package, not our failure
        if type(exc).__module__.startswith("lxml"):
            raise CleaningError(f"corrupt DOCX: its XML does not parse ({exc}); re-save it from Word") from None
        raise
    return Parsed(blocks, title, [])
