"""Prometheus gauges read from the engine at scrape time (KServe serves the default registry on /metrics)."""

from __future__ import annotations

from prometheus_client import Gauge

from predictor.engine import Engine

RUNNING = Gauge("predictor_num_requests_running", "Requests in the decode batch.")
WAITING = Gauge("predictor_num_requests_waiting", "Requests queued for a KV cache slot.")
KV_USAGE = Gauge("predictor_kv_cache_usage_ratio", "Share of the KV cache's token capacity in use.")


def watch(engine: Engine) -> None:
    RUNNING.set_function(lambda: engine.stats["running"])
    WAITING.set_function(lambda: engine.stats["waiting"])
    KV_USAGE.set_function(lambda: engine.stats["kv_cache_usage"])
