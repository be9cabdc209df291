"""Prometheus text exposition (format 0.0.4) for the service: counters, gauges and histograms with labels.

Small on purpose (no client library): every metric is a dict from a label tuple to numbers, updated under
one lock, rendered by ``Registry.render``. Label values come from the service itself (route templates,
tier names, status codes), never from request text, so the number of series stays bounded.
"""

from __future__ import annotations

import bisect
import math
import threading

# Seconds: from sub-millisecond cache hits to multi-second batches of long texts.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = registry.lock
        registry.metrics.append(self)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self.values[key] = float(value)

    def replace(self, value: float, **labels: str) -> None:
        """Set this label set and drop every other one (an info-style gauge such as the index version)."""
        key = self._key(labels)
        with self._lock:
            self.values = {key: float(value)}


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: Registry, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(registry, name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[tuple[str, ...], list] = {}  # key -> [bucket counts..., count, sum]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self.series.setdefault(key, [0] * len(self.buckets) + [0, 0.0])
            i = bisect.bisect_left(self.buckets, value)
            if i < len(self.buckets):
                series[i] += 1
            series[-2] += 1
            series[-1] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self.series.get(self._key(labels))
            return 0 if series is None else int(series[-2])

    def lines(self) -> list[str]:
        out = []
        for key, series in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip(self.buckets, series):
                cumulative += n
                le = 'le="' + _number(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative}")
            le = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {series[-2]}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {series[-2]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(series[-1])}")
        return out


class Registry:
    """The metrics of one app; ``render()`` is the body of ``GET /metrics``."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        with self.lock:
            lines: list[str] = []
            for metric in self.metrics:
                lines += metric.header() + metric.lines()
        return "\n".join(lines) + "\n"


class ServiceMetrics:
    """The service's metrics, by name (see the README's metrics list)."""

    def __init__(self) -> None:
        self.registry = r = Registry()
        self.requests = Counter(r, "embedding_service_requests_total", "HTTP requests by route, method and status.",
                                ("route", "method", "status"))
        self.latency = Histogram(r, "embedding_service_request_seconds", "Request latency in seconds by route.",
                                 ("route",))
        self.cache_hits = Counter(r, "embedding_service_cache_hits_total", "Texts served from an embedding cache tier.",
                                  ("tier",))
        self.cache_misses = Counter(r, "embedding_service_cache_misses_total", "Texts no cache tier held.")
        self.cache_errors = Counter(r, "embedding_service_cache_errors_total",
                                    "Cache lookups or writes that failed (the texts were embedded by the model).")
        self.model_texts = Counter(r, "embedding_service_model_texts_total", "Texts embedded by the model.")
        self.batch_texts = Histogram(r, "embedding_service_batch_texts", "Texts per dynamic batch.",
                                     buckets=BATCH_TEXT_BUCKETS)
        self.batch_requests = Histogram(r, "embedding_service_batch_requests", "Requests gathered per dynamic batch.",
                                        buckets=BATCH_TEXT_BUCKETS)
        self.batch_tokens = Histogram(r, "embedding_service_batch_tokens", "Tokens per dynamic batch.",
                                      buckets=BATCH_TOKEN_BUCKETS)
        self.batch_seconds = Histogram(r, "embedding_service_batch_seconds",
                                       "Seconds per batch: cache lookup, model, cache write.")
        self.index_version = Gauge(r, "embedding_service_index_version_info",
                                   "The published index version being served (value 1).", ("version",))
        self.index_vectors = Gauge(r, "embedding_service_index_vectors", "Vectors in the served index version.")
        self.index_swaps = Counter(r, "embedding_service_index_swaps_total", "Times a newly published version was opened.")
        self.model_loaded = Gauge(r, "embedding_service_model_loaded", "1 once the model is loaded.")
