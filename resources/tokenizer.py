"""The model's tokenizer from the ``tokenizers`` library alone, where it is proven to give transformers' tokens.

A Hugging Face *fast* tokenizer is a ``tokenizers.Tokenizer`` (``tokenizer.json``) inside a transformers
wrapper. Importing transformers costs about 2.3 s on 2 cores (it imports torch), which every process that
chunks a document or counts a query's tokens paid: a one-file edit, the service's start, the int8 path
that otherwise never needs torch. ``tokenizers`` imports in milliseconds and does the same work in Rust.

transformers can configure a tokenizer beyond ``tokenizer.json`` (``tokenizer_config.json``: added tokens,
legacy behaviours of some model families), so the library alone is used only where it was **proven
equal** on this machine: the first time a tokenizer (its files, and the versions of both libraries) is
seen, both tokenize the probe texts (the int8 calibration file's 1,024 real passages and edge cases:
accents, CJK, emoji, control characters, over-long text) in every way the pipeline asks (token ids,
offsets and word ids without special tokens; padded and truncated batches with them), and the verdict is
remembered in ``{user cache}/embedding-pipeline/tokenizers.json``. Any difference, any error, a folder
without ``tokenizer.json``: transformers, as before. Chunk ids depend on the tokens (chunk boundaries), so
equal tokens keep every chunk id.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import numpy as np

from resources.encoding import read_entries, remember_entry, user_cache_dir

log = logging.getLogger("embedding_pipeline.model")

# Files whose content can change what transformers' tokenizer does.
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt")
_EDGE_CASES = (
    "", " ", "a", "Héllo Wörld — naïve café, ½ ﬁ ligature", "日本語のテキストと中文字符混合 text",
    "emoji 🙂👍🏽 and symbols ∑∫√ ≠ ≤", "tabs\tand\nnew\r\nlines  double  spaces", "\u200b zero width \u00ad soft",
    "UPPER lower MiXeD 123,456.78 e-mail@example.org https://example.org/a?b=c#d",
    "[CLS] [SEP] [PAD] [MASK] [UNK] <s> </s> <pad>", "word " * 700,
)  # fmt: skip
_MODES = ("plain", "padded")
RECIPE = "tokenizers-equal-v1"


class RawEncoding:
    """What the pipeline reads of a batch: ``["input_ids"]``, ``["offset_mapping"]``, ``word_ids(i)``
    (each column converted to Python lists once, on first access)."""

    _COLUMNS = {"input_ids": "ids", "offset_mapping": "offsets", "attention_mask": "attention_mask"}

    def __init__(self, encodings: list):
        self._encodings = encodings
        self._columns: dict[str, list] = {}

    def __getitem__(self, name: str) -> list:
        if name not in self._columns:
            attribute = self._COLUMNS[name]  # KeyError for a column this class does not give
            self._columns[name] = [getattr(e, attribute) for e in self._encodings]
        return self._columns[name]

    def word_ids(self, index: int) -> list[int | None]:
        return self._encodings[index].word_ids


class RawTokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, truncation and padding off: the calls the
    pipeline makes (counting, offsets and word ids without special tokens). Thread-safe: never reconfigured."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def __call__(self, texts: list[str], *, add_special_tokens: bool = True, **_: Any) -> RawEncoding:
        return RawEncoding(self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return int(self._tokenizer.num_special_tokens_to_add(pair))


class RawFeatures:
    """Model inputs for a batch (special tokens, truncated to ``max_length``, padded to the longest) as int64
    arrays, like transformers' ``tokenizer(texts, padding=True, truncation=True, max_length=n, return_tensors="np")``."""

    def __init__(self, path: str, max_length: int):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        padding = tokenizer.padding or {}
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(direction=padding.get("direction", "right"), pad_id=padding.get("pad_id", 0),
                                 pad_type_id=padding.get("pad_type_id", 0), pad_token=padding.get("pad_token", "[PAD]"))  # fmt: skip
        self._tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }


@functools.lru_cache(maxsize=16)
def proven_equal(path: str) -> bool:
    """True when the ``tokenizers`` library alone gives transformers' tokens for the tokenizer in ``path``
    (remembered per machine; the first time it loads transformers to check)."""
    key = _key(path)
    if key is None:
        return False
    memo = _memo_path()
    known = read_entries(memo).get(key)
    if isinstance(known, bool):
        return known
    try:
        verdict = _check(path)
    except Exception as exc:  # noqa: BLE001 - any failure means: keep transformers
        log.info("the tokenizer of %s is used through transformers (%s: %s)", path, type(exc).__name__, exc)
        verdict = False
    remember_entry(memo, key, verdict)
    return verdict


def _key(path: str) -> str | None:
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        return None
    digest = hashlib.sha256(RECIPE.encode())
    for name in _FILES:
        file = folder / name
        digest.update(name.encode() + b"\x00")
        if file.is_file():
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    for dist in ("tokenizers", "transformers"):
        try:
            digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            return None
    return digest.hexdigest()


def probe_texts() -> list[str]:
    calibration = Path(__file__).with_name("int8_calibration.txt").read_text(encoding="utf-8")
    return [block for block in calibration.split("\n\n") if block.strip()] + list(_EDGE_CASES)


def _check(path: str) -> bool:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(path)
    if not getattr(reference, "is_fast", False):
        return False
    texts = probe_texts()
    raw = RawTokenizer(path)
    ours = raw(texts, add_special_tokens=False)
    theirs = reference(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for i in range(len(texts)):
        if (ours["input_ids"][i] != theirs["input_ids"][i]
                or [tuple(o) for o in ours["offset_mapping"][i]] != [tuple(o) for o in theirs["offset_mapping"][i]]
                or ours.word_ids(i) != theirs.word_ids(i)):  # fmt: skip
            log.info("tokenizers and transformers differ on probe %d for %s", i, path)
            return False
    if raw.num_special_tokens_to_add(False) != reference.num_special_tokens_to_add(pair=False):
        return False
    for max_length in (16, 128, 512):
        features = RawFeatures(path, max_length)
        for start in range(0, len(texts), 64):
            batch = texts[start : start + 64]
            mine = features(batch)
            expected = reference(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            for name, value in mine.items():
                if name in expected and not np.array_equal(value, np.asarray(expected[name], dtype=np.int64)):
                    log.info("tokenizers and transformers differ on %s at max_length %d for %s", name, max_length, path)
                    return False
    return True


def _memo_path() -> Path:
    return user_cache_dir() / "tokenizers.json"
