"""The code version of each asset: a fingerprint of the settings and component versions that change its output.

Dagster shows an asset "Unsynced" when its code version differs from the one its latest
materialization recorded, so these must move exactly when a re-run would produce different rows:
the cleaner's per-format versions, the chunker's version, settings and tokenizer, the dedup settings,
the model's files and precision, the quantization scheme, the index layout and tuning targets.
Run-time knobs that do not change output (batch sizes, threads, cache tiers, lock timeouts) are left
out. The fingerprints are the pipeline's own (``core.cleaning.cleaning_fingerprints``,
``core.chunking.CHUNKER_VERSION``, ``core.dedup.dedup_fingerprint``), so a stage that re-does work for a
new fingerprint is the same stage whose code version moved.

Reads the model's config and weight files (cached per process) but never loads torch or the model.
"""

from __future__ import annotations

from embedding_assets.core.chunking import CHUNKER_VERSION, CONTEXT_FORMAT_VERSION
from embedding_assets.core.cleaning import cleaning_fingerprints
from embedding_assets.core.dedup import MinHashSettings, dedup_fingerprint
from embedding_assets.core.identity import fingerprint
from embedding_assets.settings import Settings, model_resource

# Bump when a stage's own logic changes what it writes (its fingerprints above do not cover it).
RAW_DOCUMENTS_VERSION = "1"
QUANTIZATION_VERSION = "1"  # int8 per-dimension ranges + packed sign bits (core/quantization.py)


def model_identity(settings: Settings) -> dict[str, object]:
    """What of the model changes its vectors, without loading it: its files' digest and the precision settings.

    A model that cannot be found is named by its setting; the run then fails with the model error.
    """
    from resources.model import ModelConfigError

    resource = model_resource(settings)
    try:
        files = resource.files_digest()
        tokenizer = resource.tokenizer_fingerprint()
    except ModelConfigError:
        files = tokenizer = f"unresolved:{settings.model}"
    return {
        "files": files, "tokenizer": tokenizer, "dtype": settings.dtype, "device": settings.device,
        "max_seq_length": settings.max_seq_length, "normalize": True,
    }


def code_versions(settings: Settings) -> dict[str, str]:
    """Asset name -> code version for the seven assets."""
    from embedding_assets.core.index_version import FORMAT as INDEX_FORMAT

    model = model_identity(settings)
    dedup = MinHashSettings(
        num_perm=settings.dedup_num_perm, shingle_words=settings.dedup_shingle_words, threshold=settings.dedup_threshold
    )
    return {
        "raw_documents": fingerprint("raw_documents", {"version": RAW_DOCUMENTS_VERSION, "max_file_bytes": settings.max_file_bytes}),
        "cleaned_documents": fingerprint(
            "cleaned_documents",
            {"cleaners": cleaning_fingerprints(), "seconds_per_document": settings.clean_seconds_per_document},
        ),
        "chunks": fingerprint(
            "chunks",
            {
                "version": CHUNKER_VERSION, "chunk_tokens": settings.chunk_tokens, "overlap": settings.chunk_overlap,
                "min_chunk_tokens": settings.min_chunk_tokens, "tokenizer": model["tokenizer"],
                "max_seq_length": settings.max_seq_length,
                "context": CONTEXT_FORMAT_VERSION if settings.contextual_chunks else "off",
            },
        ),
        "deduped_chunks": dedup_fingerprint(dedup),
        # The model reads each chunk's contextual text, built here from the chunks' columns.
        "embeddings": fingerprint("embeddings", {**model, "context_format": CONTEXT_FORMAT_VERSION}),
        "quantized_embeddings": fingerprint("quantized_embeddings", {"version": QUANTIZATION_VERSION, "model": model}),
        "faiss_index": fingerprint(
            "faiss_index",
            {
                "format": INDEX_FORMAT, "layout": settings.index_layout, "target_recall": settings.target_recall,
                "recall_queries": settings.recall_queries, "min_nlist": settings.min_nlist,
                "lexical": settings.lexical_index,
            },
        ),
    }
