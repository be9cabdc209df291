"""Formats: the registry, PDF and DOCX on files generated here, UTF-16 without a BOM, per-format fingerprints."""

from __future__ import annotations

import dataclasses
import io

import pytest
from docx import Document
from pypdf import PdfReader, PdfWriter

from embedding_assets.core import cleaning, formats
from embedding_assets.core.cleaning import CleaningError, clean_document, cleaning_fingerprint, decode_bytes
from embedding_assets.core.formats import FORMATS, SUPPORTED_SUFFIXES, format_for
from embedding_assets.core.sources import SUPPORTED_SUFFIXES as SOURCE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# File generators (real files: a hand-written PDF with a text layer, python-docx documents)
# ---------------------------------------------------------------------------------------------


def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: list[list[str]], *, image_only: bool = False) -> bytes:
    """A minimal valid PDF: each page's lines drawn in Helvetica, or (``image_only``) one grey image and no text."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog, pages_obj = add(b""), add(b"")
    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    kids = []
    for lines in pages:
        if image_only:
            pixels = bytes(range(256)) * 4  # 32 x 32, 8-bit grey
            image = add(
                b"<< /Type /XObject /Subtype /Image /Width 32 /Height 32 /ColorSpace /DeviceGray "
                b"/BitsPerComponent 8 /Length %d >>\nstream\n" % len(pixels) + pixels + b"\nendstream"
            )
            stream = b"q 200 0 0 200 100 500 cm /Im1 Do Q"
            resources = b"<< /XObject << /Im1 %d 0 R >> >>" % image
        else:
            ops = ["BT /F1 12 Tf 14 TL 72 740 Td", *(f"({_pdf_escape(line)}) Tj T*" for line in lines), "ET"]
            stream = "\n".join(ops).encode("cp1252")
            resources = b"<< /Font << /F1 %d 0 R >> >>" % font
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Resources %s /Contents %d 0 R >>"
                % (pages_obj, resources, content)
            )
        )
    objects[catalog - 1] = b"<< /Type /Catalog /Pages %d 0 R >>" % pages_obj
    objects[pages_obj - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref))
    return out.getvalue()


SHORE_PAGES = [
    ["Tide pools", "Tide pools hold anemones and small crabs.", "They fill again at every high tide."],
    ["Barnacles", "Barnacles close their plates at low tide to keep water inside."],
    ["Starfish eat mussels by prying their shells open slowly."],
]


def shore_guide_pdf(*, password: str | None = None) -> bytes:
    """Three pages with an outline (two headings, the second nested) and a metadata title."""
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(SHORE_PAGES))))
    top = writer.add_outline_item(title="Tide pools", page_number=0)
    writer.add_outline_item(title="Barnacles", page_number=1, parent=top)
    writer.add_metadata({"/Title": "Shore guide"})
    if password is not None:
        writer.encrypt(user_password=password, owner_password="owner")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def lab_handbook_docx() -> bytes:
    document = Document()
    document.core_properties.title = "Lab handbook"
    document.add_heading("Freezers", level=1)
    document.add_paragraph("The minus eighty freezer alarm sounds when the door stays open.")
    document.add_heading("Alarms", level=2)
    document.add_paragraph("Call the duty technician if the alarm keeps ringing after the door is closed.")
    table = document.add_table(rows=2, cols=2)
    for (row, col), text in {(0, 0): "Freezer", (0, 1): "Room", (1, 0): "F-80", (1, 1): "B12"}.items():
        table.cell(row, col).text = text
    document.add_heading("Cleaning", level=1)
    document.add_paragraph("Defrost the freezers twice a year.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_docx_text(paragraphs: list[str]) -> bytes:
    document = Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def blocks(doc) -> list[tuple[str, int, tuple[str, ...], int | None]]:
    return [(doc.text[b.start : b.end], b.level, b.heading_path, b.page) for b in doc.blocks]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_supported_suffixes_come_from_the_registry() -> None:
    assert SUPPORTED_SUFFIXES == {s for f in FORMATS for s in f.suffixes}
    assert {".html", ".htm", ".md", ".markdown", ".rst", ".txt", ".pdf", ".docx"} == SUPPORTED_SUFFIXES
    assert SOURCE_SUFFIXES is SUPPORTED_SUFFIXES  # the scanner accepts exactly what the cleaner reads
    assert format_for(".PDF").name == "pdf"
    with pytest.raises(CleaningError, match=r"unsupported suffix '\.doc'.*\.docx"):
        format_for(".doc")


def test_each_format_has_its_own_fingerprint_and_a_change_touches_only_it(monkeypatch) -> None:
    before = cleaning.cleaning_fingerprints()
    assert len({before[s] for s in (".html", ".md", ".rst", ".txt", ".pdf", ".docx")}) == 6
    assert before[".md"] == before[".markdown"] and before[".html"] == before[".htm"]
    markdown = format_for(".md")
    changed = dataclasses.replace(markdown, version=markdown.version + "-changed")
    monkeypatch.setitem(formats._BY_SUFFIX, ".md", changed)
    monkeypatch.setitem(formats._BY_SUFFIX, ".markdown", changed)
    after = cleaning.cleaning_fingerprints()
    assert {s for s in before if before[s] != after[s]} == {".md", ".markdown"}
    monkeypatch.setattr(cleaning, "CLEANER_VERSION", cleaning.CLEANER_VERSION + "-shared")
    assert all(cleaning_fingerprint(s) != before[s] for s in before)  # the shared version re-cleans everything


# ---------------------------------------------------------------------------------------------
# Decoding: UTF-16 without a BOM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "label"), [("utf-16-le", "UTF-16 LE"), ("utf-16-be", "UTF-16 BE")])
def test_utf16_without_bom_is_detected(encoding: str, label: str) -> None:
    text = "Grüße aus Köln. The freezer log is kept in room B12, next to the autoclave.\n"
    decoded, warnings = decode_bytes(text.encode(encoding))
    assert decoded == text
    assert warnings == [f"decoded as {label} (no BOM)"]
    doc = clean_document(text.encode(encoding), ".txt")
    assert doc.text == text.strip() and doc.language in ("de", "en")


def test_binary_with_nuls_on_one_parity_is_still_binary() -> None:
    data = b"\x01\x00\x02\x00\x03\x00\x04\x00" * 500  # 16-bit integers: NULs on odd bytes, but control characters
    with pytest.raises(CleaningError, match="binary content"):
        decode_bytes(data)


# ---------------------------------------------------------------------------------------------
# PDF
# ---------------------------------------------------------------------------------------------


def test_pdf_text_pages_outline_headings_and_title() -> None:
    doc = clean_document(shore_guide_pdf(), ".pdf")
    assert doc.title == "Shore guide" and doc.language == "en" and doc.warnings == ()
    assert blocks(doc) == [
        ("Tide pools", 1, (), 1),
        ("Tide pools hold anemones and small crabs. They fill again at every high tide.", 0, ("Tide pools",), 1),
        ("Barnacles", 2, ("Tide pools",), 2),
        ("Barnacles close their plates at low tide to keep water inside.", 0, ("Tide pools", "Barnacles"), 2),
        ("Starfish eat mussels by prying their shells open slowly.", 0, ("Tide pools", "Barnacles"), 3),
    ]


def test_pdf_without_outline_still_has_pages() -> None:
    doc = clean_document(make_pdf(SHORE_PAGES), ".pdf")
    assert [b.page for b in doc.blocks] == [1, 2, 3]
    assert all(b.kind == "text" for b in doc.blocks) and doc.title is None


def test_pdf_with_empty_user_password_opens() -> None:
    doc = clean_document(shore_guide_pdf(password=""), ".pdf")
    assert "anemones" in doc.text


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: shore_guide_pdf(password="secret"), "encrypted PDF: it needs a password"),
        (lambda: make_pdf([[], []], image_only=True), r"PDF has no text layer \(2 pages"),
        (lambda: make_pdf(SHORE_PAGES)[:300], "corrupt or unreadable PDF"),
        (lambda: b"%PDF-1.7\n" + bytes(range(256)) * 8, "corrupt or unreadable PDF"),
    ],
    ids=["encrypted", "scanned", "truncated", "garbage"],
)
def test_unreadable_pdfs_are_refused_with_a_reason(make, reason: str) -> None:
    with pytest.raises(CleaningError, match=reason):
        clean_document(make(), ".pdf")


def test_pdf_with_some_empty_pages_warns() -> None:
    doc = clean_document(make_pdf([["Only the first page has text on it."], []]), ".pdf")
    assert doc.warnings == ("1 of 2 PDF pages have no text layer",)


# ---------------------------------------------------------------------------------------------
# DOCX
# ---------------------------------------------------------------------------------------------


def test_docx_heading_styles_tables_and_title() -> None:
    doc = clean_document(lab_handbook_docx(), ".docx")
    assert doc.title == "Lab handbook" and doc.language == "en"
    assert blocks(doc) == [
        ("Freezers", 1, (), None),
        ("The minus eighty freezer alarm sounds when the door stays open.", 0, ("Freezers",), None),
        ("Alarms", 2, ("Freezers",), None),
        ("Call the duty technician if the alarm keeps ringing after the door is closed.", 0, ("Freezers", "Alarms"), None),
        ("Freezer | Room", 0, ("Freezers", "Alarms"), None),
        ("F-80 | B12", 0, ("Freezers", "Alarms"), None),
        ("Cleaning", 1, (), None),
        ("Defrost the freezers twice a year.", 0, ("Cleaning",), None),
    ]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512), "password-protected or legacy Word file"),
        (b"PK\x03\x04 not really a zip", "corrupt or unreadable DOCX"),
        (b"plain text with a .docx name", "corrupt or unreadable DOCX"),
    ],
    ids=["ole-encrypted", "broken-zip", "not-a-zip"],
)
def test_unreadable_docx_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(CleaningError, match=reason):
        clean_document(data, ".docx")


def test_truncated_docx_is_refused() -> None:
    with pytest.raises(CleaningError, match="corrupt or unreadable DOCX"):
        clean_document(lab_handbook_docx()[:2000], ".docx")
