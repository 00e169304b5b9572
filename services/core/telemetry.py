"""Prometheus metrics shared by every edge in the process (the API serves them at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INSTANCES_RECEIVED = Counter(
    "crgate_instances_received_total",
    "Instances accepted by the ingest path",
    ["channel", "outcome"],  # outcome: stored, duplicate, replaced, kept
)
BYTES_RECEIVED = Counter("crgate_bytes_received_total", "Bytes of accepted instances", ["channel"])
INGEST_FAILURES = Counter(
    "crgate_ingest_failures_total", "Instances refused by the ingest path", ["channel", "reason"]
)
HTTP_LATENCY = Histogram(
    "crgate_http_request_seconds",
    "HTTP request latency by route template",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FORWARDED = Counter(
    "crgate_forwarded_objects_total",
    "Objects sent to destinations, by the state an attempt left them in",
    ["state"],  # sent, retrying, failed
)
