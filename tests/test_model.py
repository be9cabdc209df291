"""EmbeddingModelResource: batch planning, identity (fingerprint), device choice, configuration errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resources.model import EmbeddingModelResource, ModelConfigError, plan_batches


# --------------------------------------------------------------------------- plan_batches

@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=600), min_size=0, max_size=300),
    budget=st.integers(min_value=1, max_value=20_000),
    max_batch=st.integers(min_value=1, max_value=256),
)
def test_plan_batches_covers_every_position_once_within_budget(lengths, budget, max_batch):
    lengths = np.asarray(lengths, dtype=np.int64)
    batches = plan_batches(lengths, budget, max_batch)
    positions = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    assert sorted(positions.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert 1 <= len(batch) <= max_batch
        padded = int(lengths[batch].max()) * len(batch)
        # Only a single text longer than the whole budget may exceed it, alone in its batch.
        assert padded <= budget or (len(batch) == 1 and lengths[batch[0]] > budget)


def test_plan_batches_sorts_by_length_so_padding_is_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 256, size=1000)
    batches = plan_batches(lengths, 8192, 128)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    naive = sum(int(lengths[i : i + 64].max()) * len(lengths[i : i + 64]) for i in range(0, 1000, 64))
    assert 1 - lengths.sum() / padded < 0.06  # ~32 texts per batch over a 236-token spread
    assert padded < 0.7 * naive


def test_plan_batches_rejects_a_zero_budget_naming_the_setting():
    with pytest.raises(ModelConfigError, match="EMBEDDING_TOKEN_BUDGET"):
        plan_batches(np.asarray([3, 4]), 0, 8)


# --------------------------------------------------------------------------- identity and settings

def test_fingerprint_changes_with_dtype_and_max_seq_length():
    prints = {
        EmbeddingModelResource(dtype="float32").model_fingerprint(),
        EmbeddingModelResource(dtype="bfloat16").model_fingerprint(),
        EmbeddingModelResource(dtype="bfloat16-autocast").model_fingerprint(),
        EmbeddingModelResource(dtype="float32", max_seq_length=128).model_fingerprint(),
    }
    assert len(prints) == 4
    # Settings that do not change vectors keep the fingerprint (cache hits survive re-tuning).
    assert (
        EmbeddingModelResource(dtype="float32", token_budget=1024, batch_size=7, cpu_threads=1).model_fingerprint()
        == EmbeddingModelResource(dtype="float32").model_fingerprint()
    )


def test_auto_device_is_cpu_here_and_auto_dtype_is_a_concrete_precision():
    model = EmbeddingModelResource()
    assert model.resolved_device() == "cpu"
    assert model.resolved_dtype() in ("float32", "bfloat16", "int8")  # int8: tests/test_int8.py says when
    assert model.model_fingerprint() == EmbeddingModelResource(dtype=model.resolved_dtype()).model_fingerprint()


def test_unknown_dtype_is_refused_naming_the_setting():
    with pytest.raises(ModelConfigError, match="EMBEDDING_DTYPE"):
        EmbeddingModelResource(dtype="int4").resolved_dtype()


def test_bad_model_path_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(ModelConfigError, match="EMBEDDING_MODEL"):
        EmbeddingModelResource(model=str(tmp_path / "missing")).model_path()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelConfigError, match="EMBEDDING_MODEL.*not a model folder"):
        EmbeddingModelResource(model=str(tmp_path / "empty")).model_fingerprint()


def test_max_seq_length_too_small_is_refused_naming_the_setting():
    with pytest.raises(ModelConfigError, match="EMBEDDING_MAX_SEQ_LENGTH"):
        EmbeddingModelResource(max_seq_length=2).effective_max_seq_length()


def test_max_seq_length_past_the_models_default_is_honoured_up_to_its_position_embeddings():
    """all-MiniLM-L6-v2 defaults to 256 tokens and has 512 position embeddings: 384 is taken as asked
    (it was once clamped to 256 without a word), 512 is the ceiling, 513 is refused naming both limits."""
    assert EmbeddingModelResource(max_seq_length=None).effective_max_seq_length() == 256  # the model's own
    assert EmbeddingModelResource().effective_max_seq_length() == 384  # the default, the pipeline's too
    assert EmbeddingModelResource(max_seq_length=384).effective_max_seq_length() == 384
    assert EmbeddingModelResource(max_seq_length=512).effective_max_seq_length() == 512
    assert EmbeddingModelResource().model_fingerprint() != EmbeddingModelResource(max_seq_length=None).model_fingerprint()
    with pytest.raises(ModelConfigError, match=r"max_seq_length=513 .*512 tokens.*own default is 256.*EMBEDDING_MAX_SEQ_LENGTH"):
        EmbeddingModelResource(max_seq_length=513).effective_max_seq_length()


# --------------------------------------------------------------------------- CPU streams

_TEXTS = [f"Sentence number {i} about {'tokens ' * (i % 17)}vectors and indexes." for i in range(90)]


@pytest.mark.slow
def test_streams_give_the_vectors_of_one_stream_and_of_plain_encode():
    """Two streams (forward passes on a pool, tokenizing on the caller) change nothing but speed:
    same vectors, same order, as one stream and as SentenceTransformer.encode itself."""
    one = EmbeddingModelResource(dtype="float32", cpu_streams=1, token_budget=256)
    two = EmbeddingModelResource(dtype="float32", cpu_streams=2, token_budget=256)  # ~20 batches: the queue fills
    v1, s1 = one.encode(_TEXTS)
    v2, s2 = two.encode(_TEXTS)
    assert s2.batches == s1.batches > 10
    np.testing.assert_allclose(v2, v1, atol=2e-6)
    reference = one._model().encode(_TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(v1, reference, atol=2e-6)


@pytest.mark.slow
def test_encode_puts_torch_threads_back_and_auto_streams_fit_the_cores():
    import torch

    before = torch.get_num_threads()
    model = EmbeddingModelResource(dtype="float32", cpu_threads=1, cpu_streams=2)
    model.encode(_TEXTS[:5])
    assert torch.get_num_threads() == before
    assert EmbeddingModelResource(dtype="float32").resolved_cpu_streams() == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)
    assert EmbeddingModelResource(dtype="int8").resolved_cpu_streams() == 1  # OpenVINO uses every core for one batch
    assert EmbeddingModelResource(dtype="int8", cpu_streams=2).resolved_cpu_streams() == 2


@pytest.mark.slow
def test_negative_cpu_streams_is_refused_naming_the_setting():
    with pytest.raises(ModelConfigError, match="EMBEDDING_CPU_STREAMS"):
        EmbeddingModelResource(cpu_streams=-1).encode(["x"])


def test_the_weights_digest_is_remembered_by_file_stat_and_recomputed_when_a_file_changes(tmp_path, monkeypatch):
    """Hashing the weights in every process is what the memo saves; a rewritten file (new ctime) or a
    damaged memo must never yield a stale digest."""
    import hashlib

    from resources import model as model_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 4}')
    (folder / "model.safetensors").write_bytes(b"a" * 4096)
    digest = model_module._folder_digest.__wrapped__

    def truth() -> str:
        h = hashlib.sha256()
        for name in ("config.json", "model.safetensors"):
            h.update(name.encode() + b"\x00" + (folder / name).read_bytes())
        return h.hexdigest()

    first = digest(str(folder))
    assert first == truth() and model_module._digest_memo_path().is_file()
    # A memo entry is what a second process reads: poison it to prove it is used while the files are unchanged...
    memo = model_module._digest_memo_path()
    entries = json.loads(memo.read_text())
    (key,) = entries
    memo.write_text(json.dumps({key: "f" * 64}))
    assert digest(str(folder)) == "f" * 64
    # ...and ignored once a file is rewritten (same size, new content, new ctime).
    (folder / "model.safetensors").write_bytes(b"b" * 4096)
    assert digest(str(folder)) == truth() != first
    memo.write_text("not json")
    assert digest(str(folder)) == truth()
