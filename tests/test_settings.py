"""The one settings object: README's table generated from it, values read when asked, secrets bound by name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from embedding_assets.settings import (
    TABLE_BEGIN,
    TABLE_END,
    Settings,
    SettingError,
    build_resources,
    load_settings,
    markdown_table,
)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_rows() -> dict[str, str]:
    text = README.read_text()
    table = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN): text.index(TABLE_END)]
    return {m.group(1): line for line in table.splitlines() if (m := re.match(r"\| `(EMBEDDING_[A-Z0-9_]+)` \|", line))}


def test_readme_table_is_the_generated_one():
    text = README.read_text()
    table = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN): text.index(TABLE_END)].strip()
    assert table == markdown_table(), "run `python -m embedding_assets.settings --markdown`"


def test_every_setting_documented_and_no_stale_rows():
    fields = {Settings.env_name(name) for name in Settings.model_fields}
    rows = readme_rows()
    assert set(rows) == fields, f"missing: {sorted(fields - set(rows))}; stale: {sorted(set(rows) - fields)}"
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} needs a description (it is the README's 'what')"


def test_every_embedding_variable_in_the_code_is_a_setting():
    """No EMBEDDING_* name in the package outside Settings (a variable read elsewhere would escape the table)."""
    fields = {Settings.env_name(name) for name in Settings.model_fields}
    named, constants = set(), set()
    for path in [*(REPO / "embedding_assets").rglob("*.py"), *(REPO / "resources").rglob("*.py")]:
        text = path.read_text()
        named |= set(re.findall(r"\bEMBEDDING_[A-Z0-9_]*[A-Z0-9]\b", text))
        constants |= set(re.findall(r"^\s*(EMBEDDING_[A-Z0-9_]+)\s*=", text, re.M))  # Python names, not variables
    named -= constants
    assert named - fields == set(), "document these as Settings fields"


def test_values_come_from_the_environment_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDDING_CHUNK_TOKENS", "120")
    monkeypatch.setenv("EMBEDDING_LEXICAL_INDEX", "off")
    monkeypatch.setenv("EMBEDDING_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("EMBEDDING_MAX_SEQ_LENGTH", "")  # empty = unset: the default
    monkeypatch.setenv("EMBEDDING_MIN_CHUNK_TOKENS", "")
    s = load_settings()
    assert (s.chunk_tokens, s.lexical_index, s.max_seq_length, s.min_chunk_tokens) == (120, False, 384, None)
    assert s.home_path == tmp_path / "h"
    assert build_resources(s)["warehouse"].home == str(tmp_path / "h")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [("EMBEDDING_BATCH_SIZE", "many", "EMBEDDING_BATCH_SIZE='many'"),
     ("EMBEDDING_CACHE_AUDIT_RATE", "2", "EMBEDDING_CACHE_AUDIT_RATE='2'"),
     ("EMBEDDING_INDEX_LAYOUT", "pq", "EMBEDDING_INDEX_LAYOUT='pq'"),
     ("EMBEDDING_LEXICAL_INDEX", "maybe", "EMBEDDING_LEXICAL_INDEX='maybe'")],
)
def test_bad_values_name_the_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError, match=re.escape(message)):
        load_settings()


def test_secrets_are_bound_by_name_and_never_shown(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDDING_HOME", str(tmp_path))
    monkeypatch.setenv("EMBEDDING_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    monkeypatch.setenv("EMBEDDING_CACHE_SECRET", "not-a-short-secret-value")
    s = load_settings()
    assert "hunter2" not in repr(s) and "not-a-short" not in repr(s)
    cache = build_resources(s)["cache"]
    assert isinstance(cache.redis_url, dg.EnvVar) and cache.redis_url.env_var_name == "EMBEDDING_REDIS_URL"
    assert isinstance(cache.secret, dg.EnvVar) and cache.secret.env_var_name == "EMBEDDING_CACHE_SECRET"
    monkeypatch.setenv("EMBEDDING_CACHE_SECRET", "short")
    monkeypatch.setenv("EMBEDDING_LRU_ENTRIES", "-1")
    with pytest.raises(SettingError) as caught:
        load_settings()
    assert "EMBEDDING_LRU_ENTRIES" in str(caught.value) and "hunter2" not in str(caught.value)


def test_importing_the_assets_reads_no_environment():
    """Config defaults are not computed at import: a bad value fails when settings are read, not on import."""
    code = "import embedding_assets.assets, embedding_assets.sensors, embedding_assets.schedules, embedding_assets.jobs"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "EMBEDDING_CHUNK_TOKENS": "lots",
           "EMBEDDING_SENSOR_INTERVAL_SECONDS": "soon", "EMBEDDING_REINDEX_CRON": "nightly"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    code = "from embedding_assets.definitions import defs"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "EMBEDDING_CHUNK_TOKENS='lots'" in done.stderr


def test_markdown_command_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{TABLE_BEGIN}\n| old | row |\n{TABLE_END}\n\noutro\n")
    done = subprocess.run(
        [sys.executable, "-m", "embedding_assets.settings", "--markdown", "--readme", str(readme)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n") and "| old | row |" not in text
    assert markdown_table() in text
