"""The CLI's unchanged re-run without Dagster (embedding_assets/unchanged.py, issue 15 item 1).

A state is remembered only after a full run that wrote nothing with nothing moving while it ran; the next
``materialize`` with the same command then skips Dagster. Every input a run reads must defeat it: the
real CLI runs in a subprocess on the fixture corpus (real DuckDB, the real model, a real Dagster instance),
and the parts are checked one by one on temporary folders.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from embedding_assets import unchanged
from embedding_assets.settings import load_settings
from tests.cli_support import ROOT, cli, cli_env, copy_corpus, delete_partition, dynamic_partitions, ok

# A process in which importing Dagster or DuckDB fails: a run that needs either cannot pass unnoticed.
NO_DAGSTER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dagster", "duckdb", "torch", "openvino"):
            raise ImportError(f"the shortcut imported {name}")
sys.meta_path.insert(0, Block())
from embedding_assets.cli import main
sys.exit(main(sys.argv[1:]))
"""


def materialize(env: dict[str, str], *args: str, prefix=()) -> dict:
    done = ok(cli(env, "materialize", "--json", *args, prefix=prefix))
    return json.loads(done.stdout)


def without_dagster(env: dict[str, str], *args: str) -> dict:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NO_DAGSTER, "materialize", "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def settle(env: dict[str, str], *args: str) -> dict:
    """Run until the state is remembered: a full run proved it settled (one run when nothing changed), or
    it already was; the last report."""
    report = materialize(env, *args)
    if not (report["shortcut"].get("remembered") or report["shortcut"]["taken"]):
        report = materialize(env, *args)
        assert report["shortcut"] == {"taken": False, "remembered": True}, report["shortcut"]
    return report


@pytest.mark.slow
def test_an_unchanged_rerun_skips_dagster_and_every_change_defeats_it(tmp_path):
    copy_corpus(tmp_path / "sources")
    env = cli_env(tmp_path, EMBEDDING_DEVICE="cpu")

    first = materialize(env)
    assert first["shortcut"]["taken"] is False
    assert first["shortcut"].get("remembered") is False and "warehouse" in first["shortcut"]["why"]  # it did work
    proof = settle(env)
    assert proof["sources"]["alpha"]["summary"]["embedded_by_model"] == 0

    # Remembered: Dagster and DuckDB are never imported, and the report is the proving run's.
    fast = without_dagster(env)
    assert fast["shortcut"]["taken"] is True and fast["shortcut"]["since"]
    assert fast["sources"] == proof["sources"] and fast["index"] == proof["index"]
    text = ok(cli(env, "materialize")).stdout
    assert "nothing changed since" in text and "--full-check" in text and "pydocs" not in text

    # --full-check runs the jobs, and (nothing changed) proves the state again.
    forced = materialize(env, "--full-check")
    assert forced["shortcut"] == {"taken": False, "why": "--full-check", "remembered": True}

    # An edited document: a full run that does the work, then a proof, then the shortcut again.
    doc = tmp_path / "sources" / "alpha" / "winter-beekeeping.md"
    doc.write_text(doc.read_text() + "\n\n## Spring\n\nSea stars regrow lost arms over months, unlike bees.\n")
    edited = materialize(env)
    assert edited["shortcut"]["taken"] is False
    assert edited["sources"]["alpha"]["summary"]["documents"]["updated"] == 1
    assert edited["sources"]["alpha"]["summary"]["embedded_by_model"] > 0
    assert edited["index"]["build_mode"] != "unchanged"
    settle(env)
    assert without_dagster(env)["shortcut"]["taken"] is True

    # A setting that changes results: the memo's command is the same, its inputs are not.
    changed = materialize({**env, "EMBEDDING_DEDUP_THRESHOLD": "0.9"})
    assert changed["shortcut"]["taken"] is False
    settle(env)  # back to the remembered settings: proved again (the setting's run changed dedup rows)

    # Another command (one source) has its own entry; its runs move the instance, so the all-sources
    # entry needs a new proof.
    assert materialize(env, "--source", "beta")["shortcut"] == {"taken": False, "remembered": True}
    assert without_dagster(env, "--source", "beta")["shortcut"]["taken"] is True
    assert materialize(env)["shortcut"] == {"taken": False, "remembered": True}
    assert without_dagster(env)["shortcut"]["taken"] is True

    # A published version's file damaged: the full run sees it (and repairs it).
    settings = load_settings(home=tmp_path / "home", sources_dir=tmp_path / "sources")
    index_root = settings.home_path / "index"
    version = (index_root / "CURRENT").read_text().strip()
    victim = sorted(p for p in (index_root / "versions" / version).rglob("*") if p.is_file())[0]
    victim.write_bytes(victim.read_bytes()[:-1])
    assert materialize(env)["shortcut"]["taken"] is False
    settle(env)

    # The partition deleted in the Dagster instance (as the UI can): the full run adds it back.
    delete_partition(tmp_path / "dagster", "alpha")
    assert "alpha" not in dynamic_partitions(tmp_path / "dagster")
    readded = materialize(env)
    assert readded["shortcut"] == {"taken": False, "remembered": True}  # the rows were all there: nothing written
    assert "alpha" in dynamic_partitions(tmp_path / "dagster")  # reading the instance moves none of its files
    assert without_dagster(env)["shortcut"]["taken"] is True

    # A damaged memo is no memo.
    (tmp_path / "home" / unchanged.MEMO_NAME).write_text("{not json")
    assert materialize(env)["shortcut"] == {"taken": False, "remembered": True}
    assert materialize(env)["shortcut"]["taken"] is True


# ------------------------------------------------------------------------------------ the parts, one by one


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A home, a source, a model folder and a Dagster home under tmp_path, with the environment pointing there."""
    for name in ("home", "sources/alpha", "model", "dagster/history/runs", "code"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "sources" / "alpha" / "a.md").write_text("# A\n\nalpha text\n")
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "home" / "warehouse.duckdb").write_bytes(b"db")
    (tmp_path / "dagster" / "history" / "runs.db").write_bytes(b"runs")
    (tmp_path / "code" / "module.py").write_text("x = 1\n")
    monkeypatch.setenv("EMBEDDING_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMBEDDING_SOURCES_DIR", str(tmp_path / "sources"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setattr(unchanged, "_PACKAGES", (tmp_path / "code",))
    return tmp_path


COMMAND = unchanged.Command(("alpha",), allow_empty=False, no_index=False)


def _parts(tmp: Path) -> dict[str, str]:
    return unchanged.inputs(load_settings(), COMMAND, str(tmp / "model")).parts


def _bump(path: Path, data: bytes = b"!") -> None:
    with open(path, "ab") as fh:
        fh.write(data)


@pytest.mark.parametrize(
    ("part", "change"),
    [
        ("sources", lambda t, mp: _bump(t / "sources" / "alpha" / "a.md")),
        ("sources", lambda t, mp: (t / "sources" / "alpha" / "b.md").write_text("new")),
        ("sources", lambda t, mp: (t / "sources" / "alpha" / "a.md").unlink()),
        ("sources", lambda t, mp: (t / "sources" / "alpha" / "a.md").chmod(0o600)),
        ("warehouse", lambda t, mp: _bump(t / "home" / "warehouse.duckdb")),
        ("warehouse", lambda t, mp: (t / "home" / "warehouse.duckdb.wal").write_bytes(b"w")),
        ("index", lambda t, mp: _publish(t, "v2")),
        ("model", lambda t, mp: _bump(t / "model" / "config.json", b" ")),
        ("model", lambda t, mp: (t / "model" / "model.safetensors").write_bytes(b"w")),
        ("code", lambda t, mp: _bump(t / "code" / "module.py", b"\n")),
        ("settings", lambda t, mp: mp.setenv("EMBEDDING_CHUNK_OVERLAP", "16")),
        ("settings", lambda t, mp: mp.setenv("HF_HUB_OFFLINE", "1")),
        ("settings", lambda t, mp: mp.chdir(t)),
    ],
)
def test_each_input_moves_its_part(state, part, change, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("EMBEDDING_CHUNK_OVERLAP", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _publish(state, "v1")
    before = _parts(state)
    change(state, monkeypatch)
    after = _parts(state)
    assert [k for k in before if before[k] != after[k]] == [part]


def _publish(tmp: Path, version: str) -> None:
    folder = tmp / "home" / "index" / "versions" / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(version)
    (tmp / "home" / "index" / "CURRENT").write_text(version)


def test_a_published_file_damaged_in_place_moves_the_index_part(state):
    _publish(state, "v1")
    before = _parts(state)
    manifest = state / "home" / "index" / "versions" / "v1" / "manifest.json"
    stat = manifest.stat()
    manifest.write_text("v0")  # same size; mtime set back: the ctime still moves
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _parts(state)["index"] != before["index"]


def test_dagster_home_set_by_the_cli_is_not_a_settings_change(state, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME")
    before = _parts(state)
    monkeypatch.setenv("DAGSTER_HOME", str(state / "dagster"))
    assert _parts(state) == before


def test_remembered_only_when_nothing_moved_and_until_anything_does(state):
    settings = load_settings()
    before = unchanged.inputs(settings, COMMAND, str(state / "model"))
    report = {"sources": {"alpha": {"summary": {}}}, "index": None, "seconds": 1.0}
    _bump(state / "home" / "warehouse.duckdb")  # a writer while the run ran (or the run's own work)
    assert unchanged.remember(settings, COMMAND, before, report, str(state / "model")) == ["warehouse"]
    assert unchanged.remembered(settings, COMMAND) is None
    assert not (state / "home" / unchanged.MEMO_NAME).exists()

    before = unchanged.inputs(settings, COMMAND, str(state / "model"))
    assert unchanged.remember(settings, COMMAND, before, report, str(state / "model")) == []
    assert unchanged.remembered(settings, COMMAND)["sources"] == report["sources"]
    other = unchanged.Command(("alpha",), allow_empty=True, no_index=False)
    assert unchanged.remembered(settings, other) is None  # another command, no entry

    _bump(state / "dagster" / "history" / "runs.db")  # a run anywhere, a partition removed, a sensor tick
    assert unchanged.remembered(settings, COMMAND) is None


def test_a_secret_is_never_written_to_the_memo(state, monkeypatch):
    monkeypatch.setenv("EMBEDDING_CACHE_SECRET", "s3cret-value-of-twenty-chars")
    settings = load_settings()
    before = unchanged.inputs(settings, COMMAND, str(state / "model"))
    assert unchanged.remember(settings, COMMAND, before, {"sources": {}}, str(state / "model")) == []
    assert "s3cret" not in (state / "home" / unchanged.MEMO_NAME).read_text()


def test_where_the_shortcut_does_not_apply(state, monkeypatch):
    (state / "dagster" / "dagster.yaml").write_text("storage:\n  postgres:\n    postgres_url: postgresql://x\n")
    with pytest.raises(unchanged.NotApplicable, match="its own storage"):
        unchanged.instance_part(load_settings())
    monkeypatch.setenv("EMBEDDING_WAREHOUSE_URL", "postgresql://user:pw@127.0.0.1:1/db")
    with pytest.raises(unchanged.NotApplicable, match="PostgreSQL"):
        _parts(state)
    monkeypatch.delenv("EMBEDDING_WAREHOUSE_URL")
    shutil.rmtree(state / "sources" / "alpha")
    with pytest.raises(unchanged.NotApplicable, match="not there"):
        _parts(state)


def test_a_memo_that_cannot_be_written_remembers_nothing_and_raises_nothing(state):
    settings = load_settings()
    before = unchanged.inputs(settings, COMMAND, str(state / "model"))
    (state / "home" / unchanged.MEMO_NAME).mkdir()  # in the way: the rename fails (as on a read-only home)
    assert unchanged.remember(settings, COMMAND, before, {"sources": {}}, str(state / "model")) == []
    assert unchanged.remembered(settings, COMMAND) is None
    assert not [p for p in (state / "home").iterdir() if p.name.endswith(".tmp")]  # no scratch file left


def test_a_file_that_cannot_be_read_while_looking_means_the_full_run(state, monkeypatch):
    real = unchanged._tree

    def vanishing(folder):
        if folder == state / "code":
            raise FileNotFoundError(2, "No such file or directory", str(folder / "gone.py"))
        return real(folder)

    monkeypatch.setattr(unchanged, "_tree", vanishing)
    with pytest.raises(unchanged.NotApplicable, match="gone.py"):
        _parts(state)
