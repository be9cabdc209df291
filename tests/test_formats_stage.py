"""The cleaned_documents stage over a real DuckDB warehouse: per-format re-cleaning, the time budget."""

from __future__ import annotations

import dataclasses
import json

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


def test_a_document_over_the_time_budget_is_quarantined_and_the_source_goes_on(tmp_path):
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
