"""Request and response shapes, as pure functions: the OpenAI ``/v1/embeddings`` contract and ``/search``.

Every rejected request raises ``ApiError``, rendered in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status:

- 400 ``invalid_request_error``: malformed JSON, a body that is not an object, an unsupported option
  (``encoding_format`` other than ``float``/``base64``, ``dimensions`` other than the model's, token-id
  input, an unknown field, another model's name);
- 401 ``authentication_error``: a missing or wrong API key (see ``security``);
- 413 ``request_too_large``: more inputs than ``max_inputs``, a text longer than ``max_input_chars``,
  a body over ``max_body_bytes``;
- 422 ``invalid_value``: a well-formed request with an unusable value (empty text, ``k`` out of range);
- 503 ``service_unavailable``: no index published, or it was built with another model.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedding_assets.search import MODES
from embedding_assets.service.config import ServiceSettings

# Fields of OpenAI's embeddings request this service understands; anything else is a clear 400.
EMBEDDING_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
ENCODING_FORMATS = ("float", "base64")
SEARCH_FIELDS = ("q", "query", "k", "source", "mode", "chunks")
DEFAULT_K = 5


class ApiError(Exception):
    """A request the service answers with a 4xx/5xx; ``body()`` is OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, type="request_too_large", param=param, code="request_too_large")


def invalid_value(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, type="invalid_value", param=param, code="invalid_value")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 for anything else (never a 500)."""
    if not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


@dataclass(frozen=True)
class EmbeddingsRequest:
    texts: list[str]
    encoding_format: str


def parse_embeddings_request(data: dict[str, Any], settings: ServiceSettings, *, model_names: set[str],
                             dimension: int) -> EmbeddingsRequest:
    """Validate an OpenAI embeddings request; see the module docstring for the answers."""
    unknown = sorted(set(data) - set(EMBEDDING_FIELDS))
    if unknown:
        raise ApiError(400, f"unsupported field(s) {', '.join(unknown)}; this service takes {', '.join(EMBEDDING_FIELDS)}",
                       param=unknown[0], code="unsupported_parameter")
    model = data.get("model")
    if model is not None and model not in model_names:
        raise ApiError(400, f"model {str(model)[:100]!r} is not served here; use {sorted(model_names)[0]!r}",
                       param="model", code="model_not_found")
    encoding = data.get("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise ApiError(400, f"encoding_format {str(encoding)[:40]!r} is not supported; use 'float' or 'base64'",
                       param="encoding_format", code="unsupported_value")
    dims = data.get("dimensions")
    if dims is not None and dims != dimension:
        raise ApiError(400, f"dimensions={str(dims)[:20]} is not supported: this model's embeddings have {dimension}",
                       param="dimensions", code="unsupported_value")
    if "input" not in data:
        raise invalid_value("'input' is required: a string or a list of strings", "input")
    raw = data["input"]
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list):
        raise invalid_value(f"'input' must be a string or a list of strings, got {type(raw).__name__}", "input")
    if not texts:
        raise invalid_value("'input' is an empty list: send at least one text", "input")
    if len(texts) > settings.max_inputs:
        raise too_large(f"{len(texts)} inputs in one request; the limit is {settings.max_inputs} "
                        "(EMBEDDING_MAX_INPUTS): split the request", "input")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            if isinstance(text, (int, list)):
                raise ApiError(400, "token-id input is not supported: send the texts as strings", param="input",
                               code="unsupported_value")
            raise invalid_value(f"input[{i}] must be a string, got {type(text).__name__}", "input")
        if not text.strip():
            raise invalid_value(f"input[{i}] is empty: every text must have non-space characters", "input")
        if len(text) > settings.max_input_chars:
            raise too_large(f"input[{i}] has {len(text)} characters; the limit is {settings.max_input_chars} "
                            "(EMBEDDING_MAX_INPUT_CHARS)", "input")
    return EmbeddingsRequest(texts=texts, encoding_format=encoding)


def embeddings_response(vectors: np.ndarray, encoding_format: str, model: str, tokens: int) -> dict[str, Any]:
    """OpenAI's response: ``base64`` is the little-endian float32 bytes of each vector, base64-encoded."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        items = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        items = vectors.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int
    source: str | None
    mode: str | None = None  # None: the default mode (search.resolve_mode)
    per_document: bool = True


def parse_search(params: dict[str, Any], settings: ServiceSettings) -> SearchRequest:
    """``q`` (or ``query``), ``k`` (1..max_k, default 5), ``source``, ``mode`` (vector, lexical, hybrid) and
    ``chunks`` (true: every matching chunk, not the best chunk per document) from query parameters or a JSON body."""
    unknown = sorted(set(params) - set(SEARCH_FIELDS))
    if unknown:
        raise ApiError(400, f"unsupported field(s) {', '.join(unknown)}; search takes q, k, source, mode and chunks",
                       param=unknown[0], code="unsupported_parameter")
    query = params.get("q", params.get("query"))
    if not isinstance(query, str) or not query.strip():
        raise invalid_value("'q' is required: a non-empty query text", "q")
    if len(query) > settings.max_input_chars:
        raise too_large(f"the query has {len(query)} characters; the limit is {settings.max_input_chars}", "q")
    raw_k = params.get("k", DEFAULT_K)
    try:
        if isinstance(raw_k, bool) or isinstance(raw_k, float):
            raise ValueError
        k = int(raw_k)
    except (TypeError, ValueError):
        raise invalid_value(f"'k' must be an integer, got {str(raw_k)[:20]!r}", "k") from None
    if not 1 <= k <= settings.max_k:
        raise invalid_value(f"'k' must be between 1 and {settings.max_k}, got {k}", "k")
    source = params.get("source") or None
    if source is not None and not isinstance(source, str):
        raise invalid_value("'source' must be a string", "source")
    mode = params.get("mode") or None
    if mode is not None and mode not in MODES:
        raise invalid_value(f"'mode' must be one of {', '.join(MODES)}, got {str(mode)[:20]!r}", "mode")
    chunks = params.get("chunks", False)
    if isinstance(chunks, str):
        if chunks.lower() not in ("true", "false", "1", "0", ""):
            raise invalid_value(f"'chunks' must be true or false, got {chunks[:20]!r}", "chunks")
        chunks = chunks.lower() in ("true", "1")
    if not isinstance(chunks, bool):
        raise invalid_value("'chunks' must be true or false", "chunks")
    return SearchRequest(query=query, k=k, source=source, mode=mode, per_document=not chunks)


def hit_json(hit) -> dict[str, Any]:
    """One search hit; ``page`` only when the chunk map knows it."""
    out = {"chunk_id": hit.chunk_id, "source": hit.source, "doc_path": hit.doc_path,
           "heading_path": list(hit.heading_path), "title": hit.title, "score": round(float(hit.score), 6),
           "text": hit.text}
    if getattr(hit, "page", None) is not None:
        out["page"] = hit.page
    return out
