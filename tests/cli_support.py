"""Running the real `embedding-pipeline` CLI as a subprocess on a temporary home (issue 10, classes 5-7).

Every helper here starts a real process (``python -m embedding_assets.cli``) with EMBEDDING_HOME,
EMBEDDING_SOURCES_DIR and DAGSTER_HOME in a temporary folder, so a failure is seen exactly as a person
sees it: the exit status and what reaches stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_support import FIXTURE_CORPUS

ROOT = Path(__file__).resolve().parents[1]
DROP = "-dac_override,-dac_read_search"


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a CLI process whose whole state lives under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_", "DAGSTER_"))}
    env.update(
        EMBEDDING_HOME=str(tmp / "home"), EMBEDDING_SOURCES_DIR=str(tmp / "sources"),
        DAGSTER_HOME=str(tmp / "dagster"), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedding_assets.cli", *args]


def cli(env: dict[str, str], *args: str, prefix: list[str] | tuple = (), timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *cli_args(*args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cli_popen(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(cli_args(*args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_error(done: subprocess.CompletedProcess, *names: str, code: int | None = None) -> str:
    """The failure is exactly one ``error:`` line on stderr naming each of ``names``, no traceback,
    and a non-zero exit status (``code`` when given). Returns the line."""
    assert done.returncode != 0, f"expected a failure, got 0:\n{done.stdout[-2000:]}"
    if code is not None:
        assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr[-4000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-4000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def search_hits(env: dict[str, str], query: str, k: int = 3, prefix: list[str] | tuple = ()) -> list[dict]:
    done = ok(cli(env, "search", query, "--k", str(k), "--json", prefix=prefix))
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def copy_corpus(sources: Path, names=("alpha", "beta")) -> None:
    for name in names:
        shutil.copytree(FIXTURE_CORPUS / name, sources / name)


def clone_state(base: Path, tmp: Path) -> None:
    """A copy of a published state (sources, home, Dagster instance) that a test may damage."""
    for part in ("sources", "home", "dagster"):
        shutil.copytree(base / part, tmp / part, symlinks=True)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (lock files excluded: they are empty and only locked)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")
    }


def unprivileged_prefix(probe_dir: Path) -> list[str]:
    """Command prefix for a process without root's permission override (skips where impossible)."""
    probe = probe_dir / "closed.txt"
    probe.write_text("x")
    probe.chmod(0)
    prefix = [] if os.geteuid() != 0 else ["setpriv", f"--inh-caps={DROP}", f"--bounding-set={DROP}"]
    if prefix and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a permission error real")
    if subprocess.run([*prefix, "cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("this process cannot drop its permission override (setpriv refused or no effect)")
    return prefix


def dynamic_partitions(dagster_home: Path) -> list[str]:
    """The `sources` dynamic partitions recorded in the Dagster instance of ``dagster_home``, read by a
    separate process (the instance is the CLI's own, never opened by the test process)."""
    out = in_instance(dagster_home, "print(json.dumps(instance.get_dynamic_partitions(SOURCES_PARTITIONS_NAME)))")
    return json.loads(out.strip().splitlines()[-1])


def delete_partition(dagster_home: Path, name: str) -> None:
    """Delete a `sources` partition in the instance of ``dagster_home`` (as the UI can), in a separate process."""
    in_instance(dagster_home, "instance.delete_dynamic_partition(SOURCES_PARTITIONS_NAME, sys.argv[1])", name)


def in_instance(dagster_home: Path, statement: str, *args: str) -> str:
    """Run ``statement`` with ``instance`` open on ``dagster_home`` in a new process; its stdout."""
    code = (
        "import dagster as dg, json, sys\n"
        "from embedding_assets.partitions import SOURCES_PARTITIONS_NAME\n"
        "with dg.DagsterInstance.get() as instance:\n"
        f"    {statement}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env.update(DAGSTER_HOME=str(dagster_home), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
