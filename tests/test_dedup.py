"""MinHash near-duplicate detection: shingles, signatures, LSH bands and band keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from embedding_assets.core.dedup import (
    MinHashSettings,
    band_keys,
    dedup_fingerprint,
    estimated_jaccard,
    find_near_duplicates_within,
    lsh_bands,
    minhash_signatures,
    shingles,
    signature_from_bytes,
    signature_to_bytes,
)

SETTINGS = MinHashSettings()
REPO_ROOT = Path(__file__).resolve().parents[1]


def words_text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"word{i}" for i in rng.integers(0, 20_000, n_words))


def edited(text: str, position: int, replacement: str = "CHANGED") -> str:
    words = text.split()
    words[position] = replacement
    return " ".join(words)


def test_shingles_are_word_kgrams_of_normalized_lowercase_text():
    assert shingles("The  quick\nBrown fox jumps", 3) == [
        b"the quick brown",
        b"quick brown fox",
        b"brown fox jumps",
    ]
    assert shingles("Two words", 5) == [b"two words"]
    assert shingles("   \n\t", 5) == []
    assert shingles("", 5) == []
    # NFKC: a full-width letter shingles like its ASCII form.
    assert shingles("ｆull width", 2) == shingles("full width", 2)
    with pytest.raises(ValueError, match="shingle_words"):
        shingles("a b", 0)


def test_signatures_shape_dtype_and_identical_texts():
    text = words_text(200, seed=1)
    signatures = minhash_signatures([text, text, "  " + text.upper()], SETTINGS)
    assert signatures.shape == (3, 128) and signatures.dtype == np.uint64
    assert estimated_jaccard(signatures[0], signatures[1]) == 1.0
    assert estimated_jaccard(signatures[0], signatures[2]) == 1.0  # case and spacing ignored
    assert minhash_signatures([], SETTINGS).shape == (0, 128)


def test_signatures_match_datasketch_minhash_directly():
    text = words_text(50, seed=2)
    reference = MinHash(num_perm=128, seed=1, scheme="affine64")
    reference.update_batch(shingles(text, 5))
    np.testing.assert_array_equal(minhash_signatures([text], SETTINGS)[0], reference.hashvalues)


def test_small_edit_is_a_near_duplicate_and_unrelated_text_is_not():
    original = words_text(200, seed=3)
    near = edited(edited(original, 50), 120)
    unrelated = words_text(200, seed=4)
    signatures = minhash_signatures([original, near, unrelated], SETTINGS)
    similarities = estimated_jaccard(signatures[0], signatures[1:])
    assert similarities.shape == (2,)
    assert similarities[0] >= 0.8  # true Jaccard (186/206 = 0.90)
    assert similarities[1] < 0.1
    assert find_near_duplicates_within(signatures, SETTINGS) == [None, 0, None]


def test_short_texts():
    texts = ["Hello world", "hello   WORLD", "Hello there", "Goodbye"]
    signatures = minhash_signatures(texts, SETTINGS)
    assert find_near_duplicates_within(signatures, SETTINGS) == [None, 0, None, None]


def test_within_batch_points_to_the_earliest_kept_row():
    base = words_text(200, seed=5)
    other = words_text(200, seed=6)
    texts = [other, base, edited(base, 10), edited(base, 150), other]
    signatures = minhash_signatures(texts, SETTINGS)
    assert find_near_duplicates_within(signatures, SETTINGS) == [None, None, 1, 1, 0]
    # Reversed order: the first occurrence in the new order is the one kept.
    assert find_near_duplicates_within(signatures[::-1], SETTINGS) == [None, None, 1, 1, 0]


def test_within_batch_needs_jaccard_above_threshold_not_only_a_band_collision():
    bands, rows = lsh_bands(SETTINGS)
    first = np.arange(128, dtype=np.uint64)
    # Same first band (an LSH candidate) but only rows/128 equal values: not a near duplicate.
    one_band = first.copy()
    one_band[rows:] += 1_000
    # 0.85 of the values equal but scattered so that no band is equal: never a candidate.
    scattered = first.copy()
    scattered[[band * rows for band in range(bands)]] += 1_000
    signatures = np.stack([first, one_band, scattered])
    keys = band_keys(signatures, bands, rows)
    assert keys[0, 0] == keys[1, 0] and not set(keys[0]) & set(keys[2])
    assert estimated_jaccard(first, scattered) >= SETTINGS.threshold
    assert find_near_duplicates_within(signatures, SETTINGS) == [None, None, None]
    assert find_near_duplicates_within(np.stack([first, first.copy()]), SETTINGS) == [None, 0]


def test_lsh_bands_are_what_datasketch_chooses():
    for threshold, num_perm in [(0.8, 128), (0.5, 64), (0.9, 256)]:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert lsh_bands(MinHashSettings(num_perm=num_perm, threshold=threshold)) == (lsh.b, lsh.r)
    with pytest.raises(ValueError, match="threshold"):
        lsh_bands(MinHashSettings(threshold=1.5))


def test_band_key_collisions_are_exactly_datasketch_lsh_candidates():
    base = words_text(200, seed=9)
    texts = [base, edited(base, 3), edited(edited(base, 40), 90), words_text(200, seed=10), base[:600]]
    signatures = minhash_signatures(texts, SETTINGS)
    bands, rows = lsh_bands(SETTINGS)
    keys = band_keys(signatures, bands, rows)
    lsh = MinHashLSH(threshold=SETTINGS.threshold, num_perm=SETTINGS.num_perm)
    for position, signature in enumerate(signatures):
        lsh.insert(position, MinHash(seed=1, hashvalues=signature, scheme="affine64"))
    for position, signature in enumerate(signatures):
        ours = {other for other in range(len(texts)) if set(keys[position]) & set(keys[other])}
        theirs = set(lsh.query(MinHash(seed=1, hashvalues=signature, scheme="affine64")))
        assert ours == theirs


def test_band_keys_shape_and_band_index_separates_equal_slices():
    constant = np.full((1, 128), 42, dtype=np.uint64)
    keys = band_keys(constant, 9, 13)
    assert keys.shape == (1, 9) and keys.dtype == np.int64
    assert len(set(keys[0].tolist())) == 9
    with pytest.raises(ValueError, match="exceeds"):
        band_keys(constant, 10, 13)


_SUBPROCESS_SCRIPT = """
import json, sys
from embedding_assets.core.dedup import MinHashSettings, band_keys, lsh_bands, minhash_signatures
texts = json.loads(sys.stdin.read())
settings = MinHashSettings()
signatures = minhash_signatures(texts, settings)
keys = band_keys(signatures, *lsh_bands(settings))
print(json.dumps({"signatures": signatures.tolist(), "keys": keys.tolist()}))
"""


def test_signatures_and_band_keys_are_identical_across_processes():
    texts = [words_text(120, seed=11), "A short one", edited(words_text(120, seed=11), 7)]
    first = minhash_signatures(texts, SETTINGS)
    second = minhash_signatures(list(texts), MinHashSettings())
    np.testing.assert_array_equal(first, second)
    keys = band_keys(first, *lsh_bands(SETTINGS))
    np.testing.assert_array_equal(keys, band_keys(second.copy(), *lsh_bands(SETTINGS)))

    # A different hash seed in the child proves nothing depends on Python's salted hash().
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    completed = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT],
        input=json.dumps(texts), capture_output=True, text=True, cwd=REPO_ROOT, env=env,
        check=True, timeout=60,
    )
    child = json.loads(completed.stdout)
    np.testing.assert_array_equal(np.array(child["signatures"], dtype=np.uint64), first)
    np.testing.assert_array_equal(np.array(child["keys"], dtype=np.int64), keys)


def test_signature_bytes_round_trip_little_endian():
    signature = minhash_signatures([words_text(30, seed=12)], SETTINGS)[0]
    blob = signature_to_bytes(signature)
    assert len(blob) == 8 * 128
    assert blob[:8] == int(signature[0]).to_bytes(8, "little")
    restored = signature_from_bytes(blob, 128)
    assert restored.dtype == np.uint64
    np.testing.assert_array_equal(restored, signature)
    with pytest.raises(ValueError, match="num_perm=64"):
        signature_from_bytes(blob, 64)


def test_estimated_jaccard_counts_equal_positions():
    a = np.array([1, 2, 3, 4], dtype=np.uint64)
    assert estimated_jaccard(a, np.array([1, 2, 0, 0], dtype=np.uint64)) == 0.5
    matrix = np.array([[1, 2, 3, 4], [0, 0, 0, 4]], dtype=np.uint64)
    np.testing.assert_array_equal(estimated_jaccard(a, matrix), [1.0, 0.25])
    with pytest.raises(ValueError, match="shapes"):
        estimated_jaccard(a, np.zeros(5, dtype=np.uint64))


def test_fingerprint_changes_with_every_setting():
    base = dedup_fingerprint(SETTINGS)
    assert base.startswith("dedup-") and base == dedup_fingerprint(MinHashSettings())
    variants = [
        MinHashSettings(num_perm=64), MinHashSettings(shingle_words=3),
        MinHashSettings(threshold=0.9), MinHashSettings(seed=2), MinHashSettings(scheme="affine32"),
    ]
    assert len({base, *map(dedup_fingerprint, variants)}) == 1 + len(variants)
