"""End to end: a source with one document of every format, through the real Dagster jobs, real
model, DuckDB and FAISS; every document is searchable, with its headings, and PDF hits with their page."""

from __future__ import annotations

import json

import pytest

from tests.pipeline_support import make_pipeline
from tests.test_formats import lab_handbook_docx, shore_guide_pdf

pytestmark = pytest.mark.slow

DOCUMENTS = {
    "station.html": (
        b"<html><head><title>Station</title></head><body><nav>MENU</nav><main><h1>Weather station</h1>"
        b"<h2>Rain gauge</h2><p>Empty the rain gauge every morning at eight and write the reading in the log.</p>"
        b"</main></body></html>"
    ),
    "boats.md": b"# Boats\n\n## Outboard motors\n\nFlush the outboard motor with fresh water after every trip on the lake.\n",
    "keys.rst": b"Keys\n====\n\nCabin keys\n----------\n\nThe cabin keys hang on the hook behind the kitchen door.\n",
    "wifi.txt": b"The wireless network password is printed on the router in the library.\n",
    "shore.pdf": shore_guide_pdf(),
    "handbook.docx": lab_handbook_docx(),
}
QUERIES = [
    ("how often do I empty the rain gauge", "station.html", ["Weather station", "Rain gauge"], None),
    ("rinse the outboard motor after a trip", "boats.md", ["Boats", "Outboard motors"], None),
    ("where are the cabin keys", "keys.rst", ["Keys", "Cabin keys"], None),
    ("what is the wifi password", "wifi.txt", [], None),
    # The three-page guide is one chunk at the default size (each section is under half the smallest chunk, so
    # they are packed together): the chunk starts on page 1, and its heading path is its last section's.
    ("barnacles keep water inside at low tide", "shore.pdf", ["Tide pools", "Barnacles"], 1),
    ("who do I call when the freezer alarm rings", "handbook.docx", ["Freezers", "Alarms"], None),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, instance):
    pipeline = make_pipeline(tmp_path_factory.mktemp("formats"), instance, copy_corpus=False)
    folder = pipeline.sources_root / "formats"
    folder.mkdir()
    for name, data in DOCUMENTS.items():
        (folder / name).write_bytes(data)
    report = pipeline.run_source("formats")
    pipeline.run_index()
    return pipeline, report


def test_every_format_is_cleaned(built):
    _, report = built
    assert report["cleaned_documents"]["cleaned"] == len(DOCUMENTS)
    assert report["cleaned_documents"]["quarantined"] == 0


@pytest.mark.parametrize(("query", "path", "headings", "page"), QUERIES, ids=[q[1] for q in QUERIES])
def test_every_format_is_searchable_with_headings_and_pages(built, query, path, headings, page):
    pipeline, _ = built
    hits = pipeline.search(query, k=3)
    assert hits[0].doc_path == path
    assert hits[0].heading_path == headings
    stored = pipeline.rows("SELECT page FROM chunks WHERE chunk_id = ?", [hits[0].chunk_id])
    assert stored == [(page,)] and hits[0].page == page  # the hit itself carries its page


def test_pdf_chunks_carry_the_page_of_their_first_block(built):
    pipeline, _ = built
    rows = pipeline.rows(
        "SELECT k.page, k.heading_path FROM chunks k JOIN documents d USING (doc_id) "
        "WHERE d.relative_path = 'shore.pdf' ORDER BY k.ordinal"
    )
    assert rows and rows[0][0] == 1 and all(page in (1, 2, 3) for page, _ in rows)
    assert json.loads(rows[-1][1])[:1] == ["Tide pools"]
