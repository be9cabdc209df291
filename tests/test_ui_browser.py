"""The Dagster UI in a real browser: `dagster dev` on a free loopback port, Debian's Chromium driven by
Playwright, "Materialize all" for the fixture source, and the index's recall shown on its asset page.

In Dagster 1.13 "Materialize all" on the global lineage opens one dialog for the partitioned stages
and the unpartitioned faiss_index together: choosing the partition ("All" = the one partition
"alpha") turns its button into "Launch 1 run", a single run of all seven assets for partition alpha
(with several partitions the button becomes "Launch backfill"). Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import free_tcp_port
from tests.pipeline_support import FIXTURE_CORPUS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
SERVER_START_SECONDS = 180
RUN_SECONDS = 480  # seven step subprocesses; about 2-3 minutes on a busy 2-core machine


class DagsterDev:
    """A `dagster dev` process group (webserver + daemon + code server) on its own DAGSTER_HOME."""

    def __init__(self, tmp_path: Path):
        self.dagster_home = tmp_path / "dagster_home"
        self.embedding_home = tmp_path / "embedding_home"
        self.sources = tmp_path / "sources"
        self.log_path = tmp_path / "dagster-dev.log"
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def prepare(self) -> None:
        self.dagster_home.mkdir()
        (self.dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        shutil.copytree(FIXTURE_CORPUS / "alpha", self.sources / "alpha")
        with self.instance() as instance:
            instance.add_dynamic_partitions("sources", ["alpha"])

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.dagster_home))

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
        env.update(
            DAGSTER_HOME=str(self.dagster_home),
            EMBEDDING_HOME=str(self.embedding_home),
            EMBEDDING_SOURCES_DIR=str(self.sources),
        )
        dagster = Path(sys.executable).parent / "dagster"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(dagster), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        pytest.fail(f"dagster dev did not answer on {self.url} within {SERVER_START_SECONDS} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Interrupt the whole process group (like Ctrl-C), then kill what is left."""
        if self.process is None or self.process.poll() is not None:
            return
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        os.killpg(group, signal.SIGINT)
        try:
            self.process.wait(timeout=5)  # it exits slowly; everything lives in tmp_path, so kill the rest
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@pytest.fixture
def dagster_dev(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`make system-deps` does it)")
    server = DagsterDev(tmp_path)
    server.prepare()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def wait_for_run(server: DagsterDev) -> dg.DagsterRun:
    """The run the UI launched, once it reached a final status."""
    deadline = time.monotonic() + RUN_SECONDS
    with server.instance() as instance:
        while time.monotonic() < deadline:
            runs = instance.get_runs()
            if runs and runs[0].is_finished:
                return runs[0]
            time.sleep(3)
    pytest.fail(f"no run finished within {RUN_SECONDS} s:\n{server.log_tail()}")


def dismiss_welcome(page) -> None:
    """The first visit shows a "Join the Dagster community" dialog; skip it when it is there."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.click(timeout=5000)
    except Exception:  # noqa: BLE001 - absent in some versions/visits: nothing to dismiss
        pass


def test_materialize_all_in_the_browser_shows_recall(dagster_dev):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.set_default_timeout(60_000)
            page.goto(f"{dagster_dev.url}/asset-groups", wait_until="networkidle", timeout=120_000)
            dismiss_welcome(page)
            expect(page.get_by_text("faiss_index").first).to_be_visible()

            page.get_by_role("button", name="Materialize all…").click()
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text("Launch runs to materialize 7 assets")
            dialog.get_by_role("button", name="All", exact=True).click()  # every partition: just "alpha"
            expect(dialog).to_contain_text("1 partition")
            launch = dialog.get_by_role("button", name=re.compile(r"^Launch"))
            expect(launch).to_have_text("Launch 1 run")
            page.screenshot(path=ARTIFACTS / "ui-launch-dialog.png")
            launch.click()
            expect(page.get_by_text("Launched run")).to_be_visible()

            run = wait_for_run(dagster_dev)
            assert run.status == dg.DagsterRunStatus.SUCCESS, dagster_dev.log_tail()
            assert run.tags.get("dagster/partition") == "alpha"
            assert dg.AssetKey("faiss_index") in run.asset_selection

            page.goto(f"{dagster_dev.url}/assets/faiss_index", wait_until="networkidle")
            dismiss_welcome(page)
            expect(page.get_by_text("recall_at_10", exact=True)).to_be_visible()
            expect(page.get_by_text("bytes_per_vector", exact=True)).to_be_visible()
            page.screenshot(path=ARTIFACTS / "ui-faiss_index.png", full_page=True)

            page.get_by_role("tab", name="Checks").or_(page.get_by_role("link", name="Checks")).first.click()
            expect(page.get_by_text("recall_at_10_meets_target").first).to_be_visible()
            page.screenshot(path=ARTIFACTS / "ui-faiss_index-checks.png", full_page=True)
        finally:
            browser.close()
