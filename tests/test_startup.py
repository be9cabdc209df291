"""Start-up: loading the code location and an unchanged re-run never import the model's libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resources.model import EmbeddingModelResource, LazyTokenizer, _load_tokenizer
from tests.pipeline_support import make_pipeline

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "sentence_transformers", "datasketch", "scipy", "openvino", "nncf")

# Any import of a heavy library fails the process: the test sees the import, not a timing.
_BLOCK_HEAVY = """
import importlib.abc, sys
HEAVY = %r
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"imported {name}")
sys.meta_path.insert(0, Block())
%s
""" % (HEAVY, "%s")


def _python(code: str, env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})  # fmt: skip


def test_loading_the_definitions_imports_no_model_library():
    done = _python(_BLOCK_HEAVY % "import embedding_assets.definitions as d; d.defs.get_repository_def()")
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_lazy_tokenizer_counts_special_tokens_as_the_loaded_one_does():
    path = str(EmbeddingModelResource().model_path())
    lazy = LazyTokenizer(path)
    for pair in (False, True):
        assert lazy.num_special_tokens_to_add(pair=pair) == _load_tokenizer(path).num_special_tokens_to_add(pair=pair)
    assert lazy("two words", add_special_tokens=False)["input_ids"] == _load_tokenizer(path)(
        "two words", add_special_tokens=False)["input_ids"]  # fmt: skip


@pytest.mark.slow
def test_an_unchanged_cli_rerun_imports_no_model_library(tmp_path, instance):
    pipeline = make_pipeline(tmp_path, instance)
    pipeline.run_all()
    env = {"EMBEDDING_HOME": str(pipeline.home), "EMBEDDING_SOURCES_DIR": str(pipeline.sources_root),
           "DAGSTER_HOME": str(tmp_path / "dagster"), "EMBEDDING_DEVICE": "cpu"}  # fmt: skip
    (tmp_path / "dagster").mkdir()
    code = _BLOCK_HEAVY % "from embedding_assets.cli import main\nsys.exit(main(['materialize', '--json']))"
    done = _python(code, env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for source in ("alpha", "beta"):
        summary = report["sources"][source]["summary"]
        assert summary["embedded_by_model"] == 0
        assert summary["documents"]["added"] == summary["documents"]["updated"] == summary["documents"]["deleted"] == 0
        assert summary["documents"]["unchanged"] > 0
    assert report["index"]["build_mode"] == "unchanged"
