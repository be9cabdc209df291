"""Every precision path of EmbeddingModelResource gives vectors close to float32 (correctness, not speed)."""

from __future__ import annotations

import numpy as np
import pytest

from resources.model import EmbeddingModelResource

# A few dozen texts of mixed length (so batches are planned with several widths and padding).
TEXTS = [
    f"Section {i}. " + " ".join(
        ["The json module encodes Python objects as JSON text and decodes them back."] * (1 + i % 5)
        + ["Use shutil.copytree to copy a directory tree; glob expands wildcards."] * (i % 3)
    )
    for i in range(24)
]


@pytest.fixture(scope="module")
def float32_vectors() -> np.ndarray:
    vectors, _ = EmbeddingModelResource(dtype="float32", token_budget=2048).encode(TEXTS)
    return vectors


@pytest.mark.parametrize(
    ("dtype", "min_cosine"),
    [("bfloat16", 0.995), ("bfloat16-autocast", 0.995), ("float16", 0.999)],
)
@pytest.mark.slow
def test_precision_path_is_close_to_float32(dtype, min_cosine, float32_vectors):
    vectors, stats = EmbeddingModelResource(dtype=dtype, token_budget=2048).encode(TEXTS)
    assert vectors.shape == float32_vectors.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * float32_vectors).sum(axis=1)
    assert cosines.min() >= min_cosine, f"{dtype}: min cosine {cosines.min():.5f}"
    # Pairwise similarities (what search ranks by) move by far less than the gap between texts.
    assert np.abs(vectors @ vectors.T - float32_vectors @ float32_vectors.T).max() < 0.02
    assert stats.batches > 1 and stats.texts == len(TEXTS)


@pytest.mark.slow
def test_batching_does_not_change_vectors(float32_vectors):
    """Order is restored after length-sorted batching, whatever the budget."""
    vectors, stats = EmbeddingModelResource(dtype="float32", token_budget=100_000, batch_size=1000, cpu_streams=1).encode(TEXTS)
    assert stats.batches == 1
    assert np.abs(vectors - float32_vectors).max() < 1e-4
    single, _ = EmbeddingModelResource(dtype="float32").encode([TEXTS[5]])
    assert np.abs(single[0] - float32_vectors[5]).max() < 1e-4
