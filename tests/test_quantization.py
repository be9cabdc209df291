"""int8 / binary quantization with fixed calibration ranges."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_assets.core.quantization import (
    QuantizationError,
    bytes_per_vector,
    calibration_ranges,
    dequantize_int8,
    int8_rescore,
    quantize_binary,
    quantize_int8,
    ranges_from_bytes,
    ranges_to_bytes,
)

DIM = 64


def unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((30, DIM))
    vectors = centers[rng.integers(0, 30, n)] + 0.7 * rng.standard_normal((n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    vectors = unit_vectors(5_000, seed=0)
    return vectors, calibration_ranges(vectors[:1_000])


def test_calibration_ranges_are_per_dimension_min_max():
    sample = np.array([[0.0, -1.0, 2.0], [1.0, 3.0, 2.0]], dtype=np.float64)
    ranges = calibration_ranges(sample)
    assert ranges.dtype == np.float32 and ranges.shape == (2, 3)
    np.testing.assert_array_equal(ranges, [[0.0, -1.0, 2.0], [1.0, 3.0, 2.0]])
    np.testing.assert_array_equal(calibration_ranges(sample[:1]), [sample[0], sample[0]])


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        (np.zeros((0, 4), np.float32), "empty"),
        (np.zeros(4, np.float32), "2-D"),
        (np.array([[0.0, np.nan]], np.float32), "NaN"),
        (np.array([[0.0, np.inf]], np.float32), "infinite"),
        (np.zeros((2, 4), np.int8), "float"),
    ],
)
def test_calibration_ranges_rejects_bad_samples(sample, reason):
    with pytest.raises(QuantizationError, match=reason):
        calibration_ranges(sample)


def test_int8_code_of_a_vector_does_not_depend_on_its_batch(corpus):
    vectors, ranges = corpus
    whole = quantize_int8(vectors[:200], ranges)
    assert whole.dtype == np.int8 and whole.shape == (200, DIM)
    shuffled_order = np.random.default_rng(1).permutation(200)
    np.testing.assert_array_equal(quantize_int8(vectors[shuffled_order], ranges), whole[shuffled_order])
    np.testing.assert_array_equal(quantize_int8(vectors[150:160], ranges), whole[150:160])
    alone = quantize_int8(vectors[7:8], ranges)
    np.testing.assert_array_equal(alone, whole[7:8])
    # sentence-transformers #2837: one vector without stored ranges quantizes to zeros.
    assert np.count_nonzero(alone) > DIM // 2 and len(np.unique(alone)) > 10


def test_int8_clips_values_outside_the_ranges():
    ranges = np.array([[-1.0, -1.0], [1.0, 1.0]], dtype=np.float32)
    codes = quantize_int8(np.array([[-5.0, 5.0], [-1.0, 1.0], [0.0, 0.0]], np.float32), ranges)
    # Out-of-range values land in the same bucket as the range's own edges (the top edge
    # can fall one bucket short through float rounding in the library's floor()).
    np.testing.assert_array_equal(codes[0], codes[1])
    assert codes[0, 0] == -128 and codes[0, 1] >= 126
    assert abs(int(codes[2, 0])) <= 1


def test_int8_dequantize_error_is_within_one_bucket(corpus):
    vectors, ranges = corpus
    inside = np.clip(vectors[:500], ranges[0], ranges[1])
    restored = dequantize_int8(quantize_int8(inside, ranges), ranges)
    bucket = (ranges[1] - ranges[0]) / 255
    assert np.all(np.abs(restored - inside) <= bucket * 0.5 + 1e-6)


def test_int8_rescoring_ranks_like_float(corpus):
    vectors, ranges = corpus
    codes = quantize_int8(vectors, ranges)
    queries = unit_vectors(50, seed=2)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    scores = int8_rescore(queries, codes, ranges)
    assert scores.shape == (50, len(vectors)) and scores.dtype == np.float32
    approximate = np.argsort(-scores, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact)])
    assert recall >= 0.9
    np.testing.assert_allclose(int8_rescore(queries[0], codes, ranges), scores[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, queries @ vectors.T, atol=0.05)


def test_int8_rejects_mismatched_ranges_and_non_finite(corpus):
    vectors, ranges = corpus
    with pytest.raises(QuantizationError, match=r"shape \(2, 32\)"):
        quantize_int8(vectors[:, :32], ranges)
    bad = vectors[:2].copy()
    bad[0, 0] = np.nan
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_int8(bad, ranges)
    with pytest.raises(QuantizationError, match="query dim"):
        int8_rescore(np.ones(8, np.float32), quantize_int8(vectors[:2], ranges), ranges)


def test_binary_packs_sign_bits_eight_per_byte(corpus):
    vectors, _ = corpus
    packed = quantize_binary(vectors[:100])
    assert packed.dtype == np.uint8 and packed.shape == (100, DIM // 8)
    np.testing.assert_array_equal(np.unpackbits(packed, axis=1), (vectors[:100] > 0).astype(np.uint8))
    np.testing.assert_array_equal(quantize_binary(vectors[3:4]), packed[3:4])


def test_bytes_per_vector():
    assert bytes_per_vector(384) == {"float32": 1536, "int8": 384, "binary": 48}


def test_ranges_round_trip_through_bytes(corpus):
    _, ranges = corpus
    blob = ranges_to_bytes(ranges)
    assert len(blob) == 2 * 4 * DIM
    assert blob[:4] == np.float32(ranges[0, 0]).astype("<f4").tobytes()
    np.testing.assert_array_equal(ranges_from_bytes(blob), ranges)
    np.testing.assert_array_equal(ranges_from_bytes(blob, DIM), ranges)
    with pytest.raises(QuantizationError, match="dim=32"):
        ranges_from_bytes(blob, 32)
    with pytest.raises(QuantizationError, match="3 bytes"):
        ranges_from_bytes(b"abc")


def test_codes_equal_sentence_transformers_own_quantizer():
    """Our numpy quantizer (no torch import) gives exactly sentence-transformers' codes."""
    from sentence_transformers.util.quantization import quantize_embeddings

    from embedding_assets.core.quantization import calibration_ranges, quantize_binary, quantize_int8

    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ranges = calibration_ranges(x[:100])  # later rows fall outside: clipping is exercised too
    clipped = np.clip(x, ranges[0], ranges[1])
    assert np.array_equal(quantize_int8(x, ranges), quantize_embeddings(clipped, precision="int8", ranges=ranges))
    assert np.array_equal(quantize_binary(x), quantize_embeddings(x, precision="ubinary"))
    constant = np.stack([ranges[0], ranges[0]]).astype(np.float32)  # zero-width ranges
    assert np.array_equal(quantize_int8(x, constant), quantize_embeddings(np.clip(x, constant[0], constant[1]), precision="int8", ranges=constant))
