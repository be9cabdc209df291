"""Stable identities: the one definition of every id and hash the pipeline stores.

Every id here is a pure function of content and settings, never of run order, process
or time, so re-running anything with the same inputs produces the same ids on any machine.

- A document is ``(source, relative_path)``; its ``doc_id`` hashes exactly that pair and
  its content is identified separately by ``content_sha256`` of the raw bytes.
- A chunk's ``text_sha256`` hashes its normalized text; it is the exact-duplicate key and,
  together with the model fingerprint, the embedding cache key.
- A ``chunk_id`` hashes ``(doc_id, text_sha256, occurrence)``: the same text at the same
  place of the same document keeps its id when other parts of the document change.
- A ``vector_id`` is the signed int64 FAISS carries; it is derived from the chunk id.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import Any

_WHITESPACE = re.compile(r"\s+")


def sha256_hex(data: bytes | str) -> str:
    """Hex sha256 of bytes, or of a string encoded as UTF-8."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def document_id(source: str, relative_path: str) -> str:
    """Identity of a document: its source (partition) and POSIX path inside it."""
    return sha256_hex(f"{source}\x00{relative_path}")[:32]


def normalize_text(text: str) -> str:
    """The normal form hashed for exact duplicates and cache keys: NFKC, single spaces, trimmed.

    Case is kept: cased models embed "Apple" and "apple" differently.
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def text_sha256(text: str) -> str:
    """Hash of a chunk's normalized text."""
    return sha256_hex(normalize_text(text))


def chunk_id(doc_id: str, text_hash: str, occurrence: int) -> str:
    """Identity of a chunk: which document, what text, and which repeat of that text in it."""
    return sha256_hex(f"{doc_id}\x00{text_hash}\x00{occurrence}")[:32]


def vector_id(chunk_id_hex: str) -> int:
    """The int64 FAISS id of a chunk: the first 63 bits of its id, so always non-negative."""
    return int(chunk_id_hex[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


def fingerprint(kind: str, settings: dict[str, Any]) -> str:
    """Short stable hash of settings that change a result (JSON with sorted keys)."""
    payload = json.dumps({"kind": kind, **settings}, sort_keys=True, default=str)
    return f"{kind}-{sha256_hex(payload)[:16]}"


def embedding_cache_key(model_fingerprint: str, text_hash: str) -> str:
    """The one cache key of an embedding, shared by every cache tier."""
    return f"emb:{model_fingerprint}:{text_hash}"
