"""The Dagster UI in a real browser: `dagster dev` on a free loopback port, Debian's Chromium driven by
Playwright, "Materialize all" for the fixture source, and the index's recall shown on its asset page.

In Dagster 1.13 "Materialize all" on the global lineage opens one dialog for the partitioned stages
and the unpartitioned faiss_index together: choosing the partition ("All" = the one partition
"alpha") turns its button into "Launch 1 run", a single run of all seven assets for partition alpha
(with several partitions the button becomes "Launch backfill"). A second "Materialize all" changes
nothing, and the UI must say so: faiss_index keeps its version and is not "Unsynced", and the no-op run
reports no cache hit rate and no throughput. Screenshots land in test-artifacts/, and in docs/ (the
README's UI path shows them) with UPDATE_DOCS_SCREENSHOTS=1.
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

from embedding_assets.cli import DAGSTER_YAML
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
        (self.dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)  # what `make ui` writes: the pool has a limit
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


def wait_for_run(server: DagsterDev, after: int = 0) -> dg.DagsterRun:
    """The run the UI launched (the first one past ``after`` runs), once it reached a final status."""
    deadline = time.monotonic() + RUN_SECONDS
    with server.instance() as instance:
        while time.monotonic() < deadline:
            runs = instance.get_runs(filters=dg.RunsFilter(job_name="__ASSET_JOB"))
            if len(runs) > after and runs[0].is_finished:
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


def shoot(page, name: str, **kwargs) -> None:
    page.screenshot(path=ARTIFACTS / name, **kwargs)
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(ARTIFACTS / name, REPO / "docs" / name)


def materialize_all(page, server: DagsterDev, runs_before: int, screenshot: str | None = None) -> dg.DagsterRun:
    """Global lineage -> "Materialize all…" -> partition "All" -> "Launch 1 run"; the finished run."""
    page.goto(f"{server.url}/asset-groups", wait_until="networkidle", timeout=120_000)
    dismiss_welcome(page)
    expect(page.get_by_text("faiss_index").first).to_be_visible()
    page.get_by_role("button", name="Materialize all…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Launch runs to materialize 7 assets")
    dialog.get_by_role("button", name="All", exact=True).click()  # every partition: just "alpha"
    expect(dialog).to_contain_text("1 partition")
    launch = dialog.get_by_role("button", name=re.compile(r"^Launch"))
    expect(launch).to_have_text("Launch 1 run")
    if screenshot:
        shoot(page, screenshot)
    launch.click()
    expect(page.get_by_text("Launched run")).to_be_visible()
    run = wait_for_run(server, after=runs_before)
    assert run.status == dg.DagsterRunStatus.SUCCESS, server.log_tail()
    assert run.tags.get("dagster/partition") == "alpha"
    assert dg.AssetKey("faiss_index") in run.asset_selection
    return run


def latest_metadata(server: DagsterDev, asset: str) -> dict:
    with server.instance() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def all_metadata(server: DagsterDev, asset: str) -> list[dict]:
    """Metadata of every materialization of ``asset``, newest first."""
    with server.instance() as instance:
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    return [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records]


def expect(*args, **kwargs):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(*args, **kwargs)


def test_materialize_all_in_the_browser_shows_recall(dagster_dev):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            first_run = materialize_all(page, dagster_dev, runs_before=0, screenshot="ui-launch-dialog.png")
            # The sources sensor may have ingested alpha at start-up just before the UI's run: whichever run
            # embedded rates its work, and a run that found nothing to embed rates nothing.
            runs = all_metadata(dagster_dev, "embeddings")
            working = [m for m in runs if m["embedded_by_model"] > 0]
            assert working, runs
            assert all(m["cache_hit_rate"] >= 0.0 and m["chunks_per_second"] > 0 for m in working), "a real run rates its work"
            assert all("cache_hit_rate" not in m and "chunks_per_second" not in m for m in runs if m["embedded_by_model"] == 0)
            index = latest_metadata(dagster_dev, "faiss_index")
            assert index["corpus_documents"] == index["corpus_by_source"].records[0].data["documents"] > 0

            page.goto(f"{dagster_dev.url}/assets/faiss_index", wait_until="networkidle")
            dismiss_welcome(page)
            expect(page.get_by_text("recall_at_10", exact=True)).to_be_visible()
            expect(page.get_by_text("bytes_per_vector", exact=True)).to_be_visible()
            expect(page.get_by_text("corpus_vectors", exact=True)).to_be_visible()
            shoot(page, "ui-faiss_index.png", full_page=True)

            page.get_by_role("tab", name="Checks").or_(page.get_by_role("link", name="Checks")).first.click()
            expect(page.get_by_text("recall_at_10_meets_target").first).to_be_visible()
            shoot(page, "ui-faiss_index-checks.png", full_page=True)

            # A second run over unchanged files: nothing embedded, nothing rated, nothing looks stale.
            materialize_all(page, dagster_dev, runs_before=1)
            again = latest_metadata(dagster_dev, "embeddings")
            assert again["embedded_by_model"] == 0 and again["chunks_looked_up"] == 0
            assert "cache_hit_rate" not in again and "chunks_per_second" not in again
            assert latest_metadata(dagster_dev, "faiss_index")["version"] == index["version"]
            page.goto(f"{dagster_dev.url}/asset-groups", wait_until="networkidle")
            dismiss_welcome(page)
            expect(page.get_by_text("faiss_index").first).to_be_visible()
            expect(page.get_by_text("Unsynced")).to_have_count(0)
            shoot(page, "ui-lineage-after-noop.png")

            # The remove_source job can be launched with a partition key from the UI.
            # The sensor may have requested alpha at start-up (never ingested then); never after the UI ingested it.
            with dagster_dev.instance() as instance:
                ingested_at = instance.get_run_record_by_id(first_run.run_id).end_time
                later = [r.dagster_run.run_id for r in instance.get_run_records(
                    filters=dg.RunsFilter(tags={"dagster/sensor_name": "sources_sensor"})) if r.create_timestamp.timestamp() > ingested_at]
            assert later == [], "the sources sensor re-ran a source the UI had just ingested unchanged"

            page.goto(f"{dagster_dev.url}/locations/__repository__@embedding_pipeline/jobs/remove_source",
                      wait_until="networkidle")
            dismiss_welcome(page)
            expect(page.get_by_text("remove_source_partition").first).to_be_visible()
            shoot(page, "ui-remove_source-job.png")
        finally:
            browser.close()
