"""Prometheus metrics in vLLM's style, on KServe's /metrics (the default registry).

Gauges are read from the engine at scrape time; per-request histograms are observed when a request finishes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from predictor.engine import Engine, Finished, GenerationStream

RUNNING = Gauge("predictor_num_requests_running", "Requests in the decode batch.")
WAITING = Gauge("predictor_num_requests_waiting", "Requests queued for a KV cache slot, and embedding inputs "
                "queued to be computed.")
KV_USAGE = Gauge("predictor_kv_cache_usage_ratio", "Share of the KV cache's token capacity in use.")

HTTP_REQUESTS = Counter("predictor_http_requests", "HTTP requests answered, by route and status.",
                        ["method", "route", "status"])
PROMPT_TOKENS = Counter("predictor_prompt_tokens", "Prompt tokens of finished generation requests.")
GENERATION_TOKENS = Counter("predictor_generation_tokens", "Tokens generated, over finished requests.")
PREFIX_CACHE_QUERIES = Counter("predictor_prefix_cache_queries",
                               "Prompt tokens looked up in the prefix cache, over finished requests.")
PREFIX_CACHE_HITS = Counter("predictor_prefix_cache_hits",
                            "Prompt tokens found in the prefix cache (not computed again), over finished requests.")
FINISHED = Counter("predictor_request_finished", "Generation requests finished, by reason.", ["finished_reason"])
EMBEDDING_PROMPTS = Counter("predictor_embedding_prompts", "Embedding inputs computed, or dropped before they were "
                            "because their client left (cancelled).", ["outcome"])

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
TTFT = Histogram("predictor_time_to_first_token_seconds", "Submission to first generated token.",
                 buckets=_LATENCY_BUCKETS)
ITL = Histogram("predictor_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                buckets=_LATENCY_BUCKETS)
E2E = Histogram("predictor_e2e_request_latency_seconds", "Submission to the last token of a request.",
                buckets=(*_LATENCY_BUCKETS, 120.0, 300.0))


def watch(engine: Engine) -> None:
    RUNNING.set_function(lambda: engine.stats["running"])
    WAITING.set_function(lambda: engine.stats["waiting"])
    KV_USAGE.set_function(lambda: engine.stats["kv_cache_usage"])
    engine.on_finished = observe_finished
    engine.on_embeddings = lambda outcome, count: EMBEDDING_PROMPTS.labels(outcome).inc(count)


def observe_finished(stream: GenerationStream, finished: Finished) -> None:
    FINISHED.labels(finished.finish_reason).inc()
    PROMPT_TOKENS.inc(finished.prompt_tokens)
    GENERATION_TOKENS.inc(finished.completion_tokens)
    if stream.cached_tokens is not None:  # it was admitted, so its prompt was looked up
        PREFIX_CACHE_QUERIES.inc(finished.prompt_tokens)
        PREFIX_CACHE_HITS.inc(finished.cached_tokens)
    if stream.first_token_at is None:
        return
    TTFT.observe(stream.first_token_at - stream.submitted_at)
    for gap in stream.token_gaps:
        ITL.observe(gap)
    E2E.observe(stream.last_token_at - stream.submitted_at)
