"""The cleaned_documents stage over a real DuckDB warehouse: per-format re-cleaning, the time budget."""

from __future__ import annotations

import dataclasses
import json

import pytest

from embedding_assets.core import formats
from embedding_assets.core.formats import format_for
from embedding_assets.stages.cleaned_documents import clean_source
from embedding_assets.stages.raw_documents import ingest_source
from resources.warehouse import WarehouseResource
from tests.test_formats import lab_handbook_docx, shore_guide_pdf

PARAGRAPH = "The field station keeps its freezer logs in room B12, next to the autoclave and the sinks."


def _source(tmp_path, files: dict[str, bytes]):
    root = tmp_path / "sources"
    folder = root / "docs"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    warehouse = WarehouseResource(home=str(tmp_path / "home"))
    ingest_source(warehouse, root, "docs", max_file_bytes=50 * 1024 * 1024)
    return warehouse


def test_changing_one_format_recleans_only_its_documents(tmp_path, monkeypatch):
    warehouse = _source(
        tmp_path,
        {
            "a.md": f"# Notes\n\n{PARAGRAPH}\n".encode(),
            "b.markdown": f"# More notes\n\n{PARAGRAPH}\n".encode(),
            "c.html": f"<h1>Page</h1><p>{PARAGRAPH}</p>".encode(),
            "d.txt": PARAGRAPH.encode(),
            "e.pdf": shore_guide_pdf(),
            "f.docx": lab_handbook_docx(),
        },
    )
    first = clean_source(warehouse, "docs", seconds_per_document=0)
    assert first.cleaned == 6 and first.quarantined == []
    pages = json.loads(warehouse.query_rows("SELECT blocks FROM cleaned_documents WHERE text LIKE '%anemones%'")[0][0])
    assert [b["page"] for b in pages] == [1, 1, 2, 2, 3]
    assert clean_source(warehouse, "docs", seconds_per_document=0).cleaned == 0

    markdown = format_for(".md")
    changed = dataclasses.replace(markdown, version=markdown.version + "-changed")
    monkeypatch.setitem(formats._BY_SUFFIX, ".md", changed)
    monkeypatch.setitem(formats._BY_SUFFIX, ".markdown", changed)
    again = clean_source(warehouse, "docs", seconds_per_document=0)
    assert again.cleaned == 2 and again.unchanged == 4


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_document_over_the_time_budget_is_quarantined_and_the_source_goes_on(tmp_path, monkeypatch, workers):
    monkeypatch.setenv("EMBEDDING_CLEAN_WORKERS", workers)
    # About 3 MB of Markdown takes seconds to parse: far over a 0.5 s budget, which only a killed worker can enforce.
    big = ("## Section\n\n" + "Some *emphasis* and `code` in a [link](http://x) paragraph.\n\n" * 50).encode() * 1000
    warehouse = _source(tmp_path, {"a-big.md": big, "b-small.txt": PARAGRAPH.encode(), "c-small.pdf": shore_guide_pdf()})
    report = clean_source(warehouse, "docs", seconds_per_document=0.5)
    assert report.cleaned == 2  # the documents after the overrun were cleaned by a fresh worker
    assert report.quarantined == [
        ("a-big.md", "cleaning took longer than 0.5 s; raise EMBEDDING_CLEAN_SECONDS_PER_DOCUMENT to index it")
    ]
    # The same budget does not try it again; a larger one does.
    assert clean_source(warehouse, "docs", seconds_per_document=0.5).cleaned == 0
    raised = clean_source(warehouse, "docs", seconds_per_document=120)
    assert raised.cleaned == 1 and raised.quarantined == []


def test_the_worker_reports_cleaning_errors_with_their_reason(tmp_path):
    warehouse = _source(tmp_path, {"bad.pdf": b"%PDF-1.7\n" + bytes(range(256)) * 8, "good.txt": PARAGRAPH.encode()})
    report = clean_source(warehouse, "docs", seconds_per_document=30)
    assert report.cleaned == 1
    assert len(report.quarantined) == 1 and report.quarantined[0][0] == "bad.pdf"
    assert report.quarantined[0][1].startswith("corrupt or unreadable PDF")


def test_documents_cleaned_by_two_workers_land_on_their_own_rows(tmp_path, monkeypatch):
    """Outcomes come back in the documents' order whichever worker finished first: each row holds its
    own document's text, and the quarantined one is named with its own reason."""
    monkeypatch.setenv("EMBEDDING_CLEAN_WORKERS", "2")
    files = {f"doc-{i:02d}.md": f"# Page {i}\n\nPage number {i} says: {PARAGRAPH}\n".encode() for i in range(40)}
    files["doc-17.pdf"] = b"%PDF-1.7\n" + bytes(range(256)) * 8
    warehouse = _source(tmp_path, files)
    report = clean_source(warehouse, "docs", seconds_per_document=30)
    assert report.cleaned == 40 and [q[0] for q in report.quarantined] == ["doc-17.pdf"]
    rows = warehouse.query_rows(
        "SELECT d.relative_path, c.title, c.text FROM cleaned_documents c JOIN documents d USING (doc_id)")
    assert len(rows) == 40
    for path, title, text in rows:
        number = int(path[4:6])
        assert title == f"Page {number}" and f"Page number {number} says" in text
