"""dtype=int8: static int8 on CPU (OpenVINO + NNCF), built once per machine, checked against float32.

Real OpenVINO and NNCF (the `int8` extra, which `make test` installs), the real model. The build
(about 30 s) happens once per test session in a temporary cache; the repair test builds again.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from resources import int8
from resources.model import EmbeddingModelResource, ModelConfigError

pytestmark = pytest.mark.slow

TEXTS = [
    "How do I open a file for reading and writing in Python?",
    "asyncio event loop",
    "The garbage collector frees cyclic references that reference counting cannot reclaim. " * 6,
    "Return a new sorted list from the items in iterable.",
    "Raised when a mapping (dictionary) key is not found in the set of existing keys.",
    "socket timeout",
]


@pytest.fixture(scope="module")
def int8_home(tmp_path_factory):
    """A cache with this model's int8 build in it (built here, once for the module)."""
    if int8.unavailable_reason():
        pytest.fail(f"the int8 extra is part of the test environment (make test installs it): {int8.unavailable_reason()}")
    home = tmp_path_factory.mktemp("int8-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(home))
        model = EmbeddingModelResource(dtype="int8")
        folder = int8.ensure_built(str(model.model_path()), model.files_digest(), _ceiling(model))
    return home, folder


def _ceiling(model: EmbeddingModelResource) -> int:
    from resources.model import _input_ceiling

    return _input_ceiling(str(model.model_path()))


def test_int8_vectors_agree_with_float32_and_keep_order(int8_home, monkeypatch):
    home, folder = int8_home
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["passed"] is True and manifest["check"]["mean_cosine"] >= int8.MIN_MEAN_COSINE
    assert manifest["check"]["texts"] >= 100 and manifest["calibration_texts"] >= 200

    ours, stats = EmbeddingModelResource(dtype="int8", token_budget=256).encode(TEXTS)  # several batches
    reference, _ = EmbeddingModelResource(dtype="float32").encode(TEXTS)
    assert ours.shape == reference.shape and ours.dtype == np.float32 and stats.batches > 1
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosines = (ours * reference).sum(1)
    assert cosines.mean() >= 0.99 and cosines.min() >= 0.97, cosines
    # Order is kept and a text's vector does not depend on its batch.
    alone, _ = EmbeddingModelResource(dtype="int8").encode([TEXTS[3]])
    assert float(alone[0] @ ours[3]) > 0.999
    # The nearest neighbours of each text among the others are float32's.
    assert [int(np.argsort(-(ours @ ours[i]))[1]) for i in range(len(TEXTS))] == [
        int(np.argsort(-(reference @ reference[i]))[1]) for i in range(len(TEXTS))
    ]


def test_int8_has_its_own_fingerprint_naming_the_recipe(int8_home, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(int8_home[0]))
    prints = {EmbeddingModelResource(dtype=d).model_fingerprint() for d in ("int8", "float32", "bfloat16")}
    assert len(prints) == 3
    assert EmbeddingModelResource(dtype="int8", cpu_streams=1).model_fingerprint() == EmbeddingModelResource(dtype="int8").model_fingerprint()
    monkeypatch.setattr(int8, "RECIPE", int8.RECIPE + "-changed")
    assert EmbeddingModelResource(dtype="int8").model_fingerprint() not in prints


def test_auto_picks_int8_only_where_it_runs_and_passed_its_check(int8_home, monkeypatch):
    home, folder = int8_home
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    from resources import model as model_module

    model_module._auto_int8.cache_clear()
    try:
        expected = "int8" if int8.cpu_int8_instructions() else ("bfloat16" if model_module._cpu_has_amx_bf16() else "float32")
        assert EmbeddingModelResource().resolved_dtype() == expected
        if int8.cpu_int8_instructions():
            # A build whose check failed is not picked by auto (it stays usable by dtype=int8 on purpose).
            manifest = json.loads((folder / "manifest.json").read_text())
            failed = {**manifest, "check": {**manifest["check"], "mean_cosine": 0.95}}
            (folder / "manifest.json").write_text(json.dumps(failed))
            model_module._auto_int8.cache_clear()
            assert EmbeddingModelResource().resolved_dtype() == ("bfloat16" if model_module._cpu_has_amx_bf16() else "float32")
            (folder / "manifest.json").write_text(json.dumps(manifest))
    finally:
        model_module._auto_int8.cache_clear()


def test_a_damaged_build_is_rebuilt_once_by_one_builder(int8_home, tmp_path, monkeypatch):
    import shutil

    home, folder = int8_home
    copy = tmp_path / "cache" / "embedding-pipeline" / "int8" / folder.name
    shutil.copytree(folder, copy)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (copy / "model.bin").write_bytes(b"\0" * 100)  # truncated weights: the manifest's size no longer matches
    builds = []
    real_build = int8._build
    monkeypatch.setattr(int8, "_build", lambda *a: (builds.append(a), real_build(*a)))
    model = EmbeddingModelResource(dtype="int8")
    for name, digest in (("older-recipe", model.files_digest()), ("other-model", "0" * 64)):
        (copy.parent / name).mkdir()
        (copy.parent / name / "manifest.json").write_text(json.dumps({"files_digest": digest}))
    found = []
    threads = [threading.Thread(target=lambda: found.append(int8.ensure_built(str(model.model_path()), model.files_digest(), _ceiling(model))))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert found == [copy, copy] and len(builds) == 1
    assert (copy / "model.bin").stat().st_size == json.loads((copy / "manifest.json").read_text())["bin_bytes"] > 1000
    assert not list(copy.parent.glob(".*.tmp"))  # no scratch folder left behind
    # One build per model is kept: this model's older build is removed, another model's stays.
    assert not (copy.parent / "older-recipe").exists() and (copy.parent / "other-model").exists()
    # A build OpenVINO cannot read (same size, garbage inside) is removed and built again when loaded.
    (copy / "model.xml").write_text("<not a model")
    runner = int8.load_runner(str(model.model_path()), model.files_digest(), _ceiling(model), 384)
    assert len(builds) == 2
    vector = runner.embed(runner.features(["hello world"]))
    assert vector.shape == (1, 384)


def test_int8_refuses_other_devices_and_unsupported_models_naming_the_setting(tmp_path, monkeypatch):
    with pytest.raises(ModelConfigError, match=r"dtype=int8 runs on the CPU only.*EMBEDDING_DEVICE"):
        EmbeddingModelResource(dtype="int8", device="cuda").resolved_dtype()
    folder = tmp_path / "dense-model"
    folder.mkdir()
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]))  # fmt: skip
    with pytest.raises(ModelConfigError, match=r"dtype=int8 supports transformer \+ pooling.*Dense.*EMBEDDING_DTYPE"):
        int8.pooling_mode(str(folder))
    monkeypatch.setattr(int8, "_installed", lambda: {"openvino": "missing", "nncf": "missing", "calibration": "-"})
    with pytest.raises(ModelConfigError, match=r"needs openvino and nncf: pip install 'embedding-pipeline\[int8\]'.*EMBEDDING_DTYPE"):
        EmbeddingModelResource(dtype="int8").resolved_dtype()


def test_calibration_and_check_texts_are_disjoint_real_text():
    calibration, check = int8.calibration_texts()
    assert len(calibration) >= 200 and len(check) >= 100
    assert not set(calibration) & set(check)
    words = sorted(len(t.split()) for t in calibration + check)
    assert words[0] <= 12 and words[-1] >= 150  # query-like lines and chunk-sized windows


def test_auto_falls_back_when_a_model_cannot_be_built_and_remembers_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(int8, "cpu_int8_instructions", lambda: "avx512_vnni")
    folder = tmp_path / "dense-model"
    folder.mkdir()
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                     {"type": "sentence_transformers.models.Dense"}]))  # fmt: skip
    builds = []
    real_build = int8._build
    monkeypatch.setattr(int8, "_build", lambda *a: (builds.append(a), real_build(*a)))
    assert int8.auto_picks_int8(str(folder), "d" * 64, 512) is False
    assert len(builds) == 1 and "Dense" in next((tmp_path / "cache").rglob(".*.failed")).read_text()
    assert int8.auto_picks_int8(str(folder), "d" * 64, 512) is False and len(builds) == 1  # not tried again
    with pytest.raises(ModelConfigError, match="Dense"):  # dtype=int8 asked for explicitly tries, and says why
        int8.ensure_built(str(folder), "d" * 64, 512)


def test_an_unwritable_cache_is_one_clear_error_naming_the_folder(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    model = EmbeddingModelResource(dtype="int8")
    with pytest.raises(ModelConfigError, match=r"cannot write the int8 model to .*not-a-folder.*XDG_CACHE_HOME"):
        int8.ensure_built(str(model.model_path()), model.files_digest(), _ceiling(model))
