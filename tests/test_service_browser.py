"""The search page in a real browser: Debian's Chromium driven by Playwright with JavaScript turned off,
typing a query into the box and submitting it; the expected document shows with its heading path and score.

Screenshots land in the test's tmp folder; with UPDATE_DOCS_SCREENSHOTS=1 one is also saved as
docs/service-search.png (the README shows it).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from embedding_assets.service import ServiceSettings
from tests.pipeline_support import QUERIES, make_pipeline
from tests.service_support import ServiceThread
from tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_typing_a_query_shows_the_expected_document_without_javascript(tmp_path, instance):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`make system-deps` does it)")
    from playwright.sync_api import expect, sync_playwright

    pipeline = make_pipeline(tmp_path, instance)
    pipeline.run_all()
    server = ServiceThread(pipeline.resources, ServiceSettings()).start()
    case = next(q for q in QUERIES if q["expected_path"] == "alpha/winter-beekeeping.md")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                context = browser.new_context(java_script_enabled=False, viewport={"width": 1100, "height": 900})
                page = context.new_page()
                page.set_default_timeout(30_000)
                page.goto(server.url + "/")
                box = page.get_by_role("searchbox", name="Query")
                box.fill(case["query"])
                box.press("Enter")  # a plain form submit: no script runs
                page.wait_for_url(re.compile(r"[?&]q="))
                hits = page.locator("li.hit")
                expect(hits.first).to_contain_text("alpha/winter-beekeeping.md")
                expect(hits.first.locator(".heading")).not_to_be_empty()
                expect(hits.first.locator(".score")).to_have_text(re.compile(r"^0\.\d{3}$"))
                expect(page.get_by_role("searchbox", name="Query")).to_have_value(case["query"])
                assert hits.count() == 5
                shot = tmp_path / "service-search.png"
                page.screenshot(path=shot, full_page=False)
                if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
                    shutil.copyfile(shot, REPO / "docs" / "service-search.png")
            finally:
                browser.close()
    finally:
        server.stop()
