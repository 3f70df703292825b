"""Prometheus metrics (prometheus-client, the default registry, text exposition at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("emkum_requests_total", "HTTP requests", ["route", "method", "status"])
REQUEST_LATENCY = Histogram("emkum_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS)
STAGE_LATENCY = Histogram(
    "emkum_stage_seconds",
    "Latency of one stage (decode, tokenize, encode_image, encode_text, ann, rerank)",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "emkum_batch_size", "Inputs per encoder batch", ["encoder"], buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
IN_FLIGHT = Gauge("emkum_requests_in_flight", "HTTP requests being served right now")
QUEUE_DEPTH = Gauge("emkum_queue_depth", "Inputs waiting for an encoder", ["encoder"])
QUEUE_REJECTIONS = Counter("emkum_queue_rejections_total", "Requests refused because a queue was full", ["encoder"])
QUEUE_WAIT = Histogram(
    "emkum_queue_wait_seconds", "Time work waited for an encoder or a search thread", ["stage"], buckets=LATENCY_BUCKETS
)
SHED = Counter(
    "emkum_shed_total",
    "Work refused with 503 because it waited past max_queue_wait_ms or its request passed its deadline",
    ["stage", "reason"],
)
ITEMS = Gauge("emkum_index_items", "Items in the index")
ERRORS = Counter("emkum_errors_total", "Error responses by kind", ["kind"])
MODEL = Info("emkum_model", "The served model and the ONNX Runtime provider")
