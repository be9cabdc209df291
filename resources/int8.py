"""Static int8 on CPU: the model run by OpenVINO, its matmuls quantized by NNCF, built once per machine.

``dtype="int8"`` (and ``dtype="auto"`` where it passes, see :func:`auto_picks_int8`) embeds with an
OpenVINO copy of the model whose weights (per channel) and activations are int8, so the CPU's int8
dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX) do the work. The recipe (:data:`RECIPE`):

- NNCF post-training quantization, ``ModelType.TRANSFORMER`` (LayerNorm, softmax, GELU and the residual
  adds stay in floating point; only the matmuls' inputs are quantized), ``QuantizationPreset.MIXED``
  (symmetric per-channel weights, asymmetric activations);
- SmoothQuant and fast bias correction (NNCF's defaults for transformers) recover the rest. Keeping the
  last encoder layer in float32 as well was measured: the same cosine to float32 (0.9969 against 0.9967)
  for 0.75-1.0x the speed, so every layer is int8;
- calibrated on real text: windows and headings of the bundled sample corpus (``int8_calibration.txt``,
  1,024 blocks), at the lengths chunks and queries have.

After quantizing, the build checks the int8 model against the float32 model on held-out texts of the
same file that calibration did not see (chunk-sized windows and short, query-like lines). The check's
mean and minimum cosine are written next to the model in ``manifest.json``; ``auto`` picks int8 only
when the mean is at least :data:`MIN_MEAN_COSINE` (the bound of issue 15). What users see, Success@10
and MRR@10 on the known-item benchmark, is measured by ``benchmarks/retrieval.py --dtype int8``.

The built model lives in the per-user cache (``$XDG_CACHE_HOME/embedding-pipeline/int8/<key>/``), keyed
by the model files' digest, the calibration length (the model's input ceiling, so one build serves every
``max_seq_length``), the recipe, the calibration texts and the OpenVINO and NNCF versions. It is a
derived artifact: every machine builds its own from the same inputs, one process at a time (a lock file),
published by renaming a finished folder into place; a damaged one is removed and rebuilt.

OpenVINO and NNCF are the optional extra ``int8`` (``pip install 'embedding-pipeline[int8]'``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedding_assets.core.identity import fingerprint, sha256_hex
from resources.encoding import ModelConfigError
from resources.locks import LockTimeout, file_lock
from resources.encoding import user_cache_dir
from resources.model import _read_json

log = logging.getLogger("embedding_pipeline.model")

# Bump when anything below changes what the built model computes.
RECIPE = "ov-nncf-transformer-mixed-v2"
MIN_MEAN_COSINE = 0.99
CALIBRATION_FILE = Path(__file__).with_name("int8_calibration.txt")
_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
# How long a process waits for another one's build of the same model (a build takes about 30-60 s on 2 cores).
BUILD_LOCK_TIMEOUT_SECONDS = 900


def unavailable_reason() -> str | None:
    """Why int8 cannot run in this environment, or None. Cheap: reads the installed distributions' metadata
    (once per process), imports neither OpenVINO nor NNCF."""
    missing = [name for name in ("openvino", "nncf") if _installed()[name] == "missing"]
    if missing:
        return f"dtype=int8 needs {' and '.join(missing)}: pip install 'embedding-pipeline[int8]'"
    return None


@functools.lru_cache(maxsize=1)
def cpu_int8_instructions() -> str | None:
    """The best int8 dot-product instruction set of this CPU (amx_int8, avx512_vnni, avx_vnni), or None.
    Without one, int8 matmuls are emulated and slower than float32: ``auto`` never picks int8 there."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return next((flag for flag in _INT8_FLAGS if flag in flags), None)


def recipe_identity() -> dict[str, str]:
    """What, besides the model's files and input length, decides the int8 model's vectors."""
    return {"recipe": RECIPE, **_installed()}


@functools.lru_cache(maxsize=1)
def _installed() -> dict[str, str]:
    """OpenVINO's and NNCF's versions and the calibration file's digest, read once per process."""
    return {
        "openvino": _version("openvino"),
        "nncf": _version("nncf"),
        "calibration": sha256_hex(CALIBRATION_FILE.read_bytes())[:16],
    }


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


@dataclass(frozen=True)
class Check:
    """The built model against float32 on held-out texts."""

    mean_cosine: float
    min_cosine: float
    texts: int

    @property
    def passed(self) -> bool:
        return self.mean_cosine >= MIN_MEAN_COSINE


def cache_root() -> Path:
    return user_cache_dir() / "int8"


def model_key(files_digest: str, calibration_length: int) -> str:
    return fingerprint("int8-model", {"files": files_digest, "calibration_length": calibration_length, **recipe_identity()})[:32]


def check_result(path: str, files_digest: str, calibration_length: int) -> Check:
    """The check of this model's int8 build, building it first if this machine has none (about 30 s, once)."""
    folder = ensure_built(path, files_digest, calibration_length)
    manifest = json.loads((folder / "manifest.json").read_text())
    return Check(**manifest["check"])


def auto_picks_int8(path: str, files_digest: str, calibration_length: int) -> bool:
    """``dtype=auto`` on CPU picks int8 when OpenVINO and NNCF are installed, the CPU has int8 dot-product
    instructions and this model's int8 build passed its check (built on first use)."""
    if unavailable_reason() or not cpu_int8_instructions():
        return False
    failed = cache_root() / f".{model_key(files_digest, calibration_length)}.failed"
    if failed.exists():  # this model's build failed on this machine: auto does not try again (dtype=int8 does)
        return False
    try:
        check = check_result(path, files_digest, calibration_length)
    except Exception as exc:  # noqa: BLE001 - any failure to build means "not int8" for auto, remembered
        log.warning("dtype=auto: not int8 for %s: %s", path, exc)
        with contextlib.suppress(OSError):
            failed.write_text(f"{type(exc).__name__}: {exc}\n")
        return False
    if not check.passed:
        log.warning("dtype=auto: not int8 for %s: mean cosine to float32 %.4f < %.2f on %d held-out texts",
                    path, check.mean_cosine, MIN_MEAN_COSINE, check.texts)  # fmt: skip
    return check.passed


# ---- building ---------------------------------------------------------------------------------------


def ensure_built(path: str, files_digest: str, calibration_length: int) -> Path:
    """The folder of this model's int8 build (model.xml, model.bin, manifest.json), built if missing.

    ``calibration_length`` is the most tokens calibration and the check read of a text: the model's input
    ceiling (its position embeddings), so one build serves every ``max_seq_length`` (the shapes are dynamic;
    a shorter input only truncates).

    One builder per machine at a time (an flock on a file beside the folder); the build happens in a
    scratch folder renamed into place whole, so a reader sees a finished build or none."""
    reason = unavailable_reason()
    if reason:
        raise ModelConfigError(f"{reason} (EMBEDDING_DTYPE)")
    root = cache_root()
    folder = root / model_key(files_digest, calibration_length)
    if _complete(folder):
        return folder
    lock = root / f".{folder.name}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(lock, exclusive=True, timeout=BUILD_LOCK_TIMEOUT_SECONDS):
            _build_once(path, calibration_length, files_digest, root, folder)
    except OSError as exc:  # LockTimeout is a TimeoutError (an OSError): told apart below
        if isinstance(exc, LockTimeout):
            raise ModelConfigError(f"dtype=int8: another process has been building the int8 model of {path} for over "
                                   f"{BUILD_LOCK_TIMEOUT_SECONDS} s ({exc}); retry, or set EMBEDDING_DTYPE=float32") from exc  # fmt: skip
        raise ModelConfigError(f"dtype=int8: cannot write the int8 model to {root} ({exc}); make it writable or set "
                               "XDG_CACHE_HOME (EMBEDDING_DTYPE)") from exc  # fmt: skip
    return folder


def _build_once(path: str, calibration_length: int, files_digest: str, root: Path, folder: Path) -> None:
    """Under the build lock: build into a scratch folder and rename it into place, unless another
    process finished the same build while this one waited."""
    if _complete(folder):
        return
    if folder.exists():  # damaged or half-removed: rebuilt
        log.warning("int8 model in %s is incomplete: rebuilding it", folder)
        shutil.rmtree(folder, ignore_errors=True)
    log.warning("building the int8 model of %s for this machine, once (about 30-60 s on 2 cores) into %s; "
                "EMBEDDING_DTYPE=float32 skips it", path, folder)  # fmt: skip
    scratch = root / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        _build(path, calibration_length, scratch, files_digest)
        os.replace(scratch, folder)
        (root / f".{folder.name}.failed").unlink(missing_ok=True)
    except ModelConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - conversion or quantization failed: said with the setting named
        raise ModelConfigError(f"dtype=int8: building the int8 model of {path} failed: {type(exc).__name__}: {exc} (EMBEDDING_DTYPE)") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _prune(root, keep=folder, files_digest=files_digest)


def _prune(root: Path, keep: Path, files_digest: str) -> None:
    """Remove this model's other builds (an older recipe or OpenVINO/NNCF version): one per model is kept."""
    for other in root.iterdir():
        if other == keep or not other.is_dir() or other.name.startswith("."):
            continue
        try:
            if json.loads((other / "manifest.json").read_text()).get("files_digest") == files_digest:
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError, AttributeError):
            continue


def _complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return (
            manifest.get("recipe") == recipe_identity()
            and (folder / "model.xml").stat().st_size > 0
            and (folder / "model.bin").stat().st_size == manifest["bin_bytes"]
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def calibration_texts() -> tuple[list[str], list[str]]:
    """(calibration, held-out check) texts from the bundled sample's blocks.

    Windows of consecutive blocks of 40 to 300 words (chunk-like) and single short blocks (heading- and
    query-like). Every fourth window and every fourth short block is held out for the check."""
    lines = [line for line in CALIBRATION_FILE.read_text().splitlines() if line and not line.startswith("#")]
    sizes = (40, 90, 160, 300)
    windows, current, words, turn = [], [], 0, 0
    for line in lines:
        current.append(line)
        words += len(line.split())
        if words >= sizes[turn % len(sizes)]:
            windows.append(" ".join(current))
            current, words, turn = [], 0, turn + 1
    short = list(dict.fromkeys(line for line in lines if 2 <= len(line.split()) <= 12))  # headings repeat
    check = [t for i, t in enumerate(windows) if i % 4 == 3] + [t for i, t in enumerate(short) if i % 4 == 3]
    held_out = set(check)
    calibration = [t for i, t in enumerate(windows) if i % 4 != 3] + [t for i, t in enumerate(short) if i % 4 != 3][::2]
    return [t for t in calibration if t not in held_out], check


def _build(path: str, calibration_length: int, into: Path, files_digest: str) -> None:
    import nncf
    import openvino as ov
    import torch
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    pooling = pooling_mode(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001 - re-raised with the setting named
        raise ModelConfigError(f"dtype=int8: cannot load {path} as a transformers model: {exc}") from exc
    calibration, check = calibration_texts()

    def features(texts: list[str], kind: str) -> dict[str, Any]:
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=calibration_length, return_tensors=kind))

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings about shapes: the shapes are made dynamic below
        converted = ov.convert_model(hf, example_input=features(calibration[:2], "pt"))
    converted.reshape({port.get_any_name(): ov.PartialShape([-1, -1]) for port in converted.inputs})
    names = [port.get_any_name() for port in converted.inputs]
    dataset = nncf.Dataset([{k: v for k, v in features([text], "np").items() if k in names} for text in calibration])
    quantized = nncf.quantize(
        converted,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration),
    )
    ov.save_model(quantized, str(into / "model.xml"), compress_to_fp16=False)

    # The check: float32 (torch) against the saved int8 model, on texts calibration did not see.
    runner = Int8Runner(str(into / "model.xml"), path, calibration_length, pooling)
    with torch.no_grad():
        feats = features(check, "pt")
        hidden = hf(**feats).last_hidden_state.numpy()
    reference = _normalized(pool(hidden, feats["attention_mask"].numpy(), pooling))
    vectors = np.concatenate([runner.embed(runner.features(check[i : i + 32])) for i in range(0, len(check), 32)])
    cosines = (_normalized(vectors) * reference).sum(1)
    result = Check(mean_cosine=float(cosines.mean()), min_cosine=float(cosines.min()), texts=len(check))
    manifest = {
        "recipe": recipe_identity(),
        "model": path,
        "files_digest": files_digest,
        "calibration_length": calibration_length,
        "pooling": pooling,
        "calibration_texts": len(calibration),
        "check": {"mean_cosine": result.mean_cosine, "min_cosine": result.min_cosine, "texts": result.texts},
        "passed": result.passed,
        "cpu_int8_instructions": cpu_int8_instructions(),
        "seconds": round(time.perf_counter() - started, 1),
        "bin_bytes": (into / "model.bin").stat().st_size,
    }
    (into / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("built the int8 model of %s in %.0f s: mean cosine to float32 %.4f (min %.4f) on %d held-out texts",
             path, manifest["seconds"], result.mean_cosine, result.min_cosine, result.texts)  # fmt: skip


# ---- running ----------------------------------------------------------------------------------------


def pooling_mode(path: str) -> str:
    """The model's pooling (mean, cls or max) from its sentence-transformers config; int8 supports models
    made of a transformer, one pooling and an optional normalization (no Dense layers)."""
    root = Path(path)
    modules = _read_json(root / "modules.json") or []
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise ModelConfigError(f"dtype=int8 supports transformer + pooling (+ normalize) models; {path} has {', '.join(unsupported)} (EMBEDDING_DTYPE)")
    config = _read_json(root / "1_Pooling" / "config.json")
    modes = [mode for mode in ("mean", "cls", "max") if config.get(f"pooling_mode_{mode}_tokens" if mode != "cls" else "pooling_mode_cls_token")]
    if not config:
        return "mean"
    if len(modes) != 1:
        raise ModelConfigError(f"dtype=int8 supports one of mean, cls or max pooling; {path} asks for {modes or 'another'} (EMBEDDING_DTYPE)")
    return modes[0]


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        return hidden[:, 0]
    m = mask[..., None].astype(np.float32)
    if mode == "max":
        return np.where(m > 0, hidden, -np.inf).max(1)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def _normalized(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class Int8Runner:
    """A compiled int8 model with the model's tokenizer and pooling: ``features`` (on the calling thread)
    then ``embed`` (any thread; each thread has its own infer request; OpenVINO releases the GIL)."""

    device = "cpu"

    def __init__(self, xml: str, path: str, max_seq_length: int, pooling: str, threads: int = 0, streams: int = 1):
        import openvino as ov

        # float32 where the model is not int8 (the last layer, norms, softmax): bf16 there would undo the check.
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": max(1, streams)}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = ov.Core().compile_model(xml, "CPU", config)
        self._names = [port.get_any_name() for port in self._compiled.inputs]
        outputs = [port for port in self._compiled.outputs if "last_hidden_state" in port.get_names()]
        self._output = outputs[0] if outputs else self._compiled.outputs[0]
        # A tokenizer of its own, not the resource's shared one (model._load_tokenizer): tokenizers are not safe
        # to share between threads, and the service counts tokens on one thread while this one encodes on another.
        # Where the tokenizers library alone is proven to give transformers' tokens, it is used (no transformers
        # import, so an int8 run imports neither transformers nor torch).
        from resources.tokenizer import RawFeatures, proven_equal

        if proven_equal(path):
            self._raw: RawFeatures | None = RawFeatures(path, max_seq_length)
        else:
            from transformers import AutoTokenizer

            self._raw, self._tokenizer = None, AutoTokenizer.from_pretrained(path)
        self._max = max_seq_length
        self._pooling = pooling
        self._local = threading.local()

    def features(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self._raw is not None:
            found = self._raw(texts)
            return {k: v for k, v in found.items() if k in self._names or k == "attention_mask"}
        found = self._tokenizer(texts, padding=True, truncation=True, max_length=self._max, return_tensors="np")
        return {k: v for k, v in found.items() if k in self._names or k == "attention_mask"}

    def embed(self, features: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer({k: v for k, v in features.items() if k in self._names})
        return _normalized(pool(result[self._output], features["attention_mask"], self._pooling)).astype(np.float32)


def load_runner(path: str, files_digest: str, calibration_length: int, max_seq_length: int, threads: int = 0, streams: int = 1) -> Int8Runner:
    """The int8 model of ``path`` compiled for this CPU (built first if needed); a build OpenVINO cannot
    read is removed and built again once."""
    pooling = pooling_mode(path)
    for attempt in (1, 2):
        folder = ensure_built(path, files_digest, calibration_length)
        try:
            return Int8Runner(str(folder / "model.xml"), path, max_seq_length, pooling, threads, streams)
        except RuntimeError as exc:
            if attempt == 2:
                raise ModelConfigError(f"dtype=int8: the int8 model in {folder} cannot be loaded after a rebuild: {exc}") from exc
            log.warning("int8 model in %s cannot be loaded (%s): rebuilding it", folder, str(exc).splitlines()[0] if str(exc) else exc)
            with contextlib.suppress(OSError):
                (folder / "manifest.json").unlink()
    raise AssertionError("unreachable")
