"""Prometheus metrics, one registry per process (each service is its own process)."""

from __future__ import annotations

import prometheus_client as prom

from .tls import Tls

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

requests_total = prom.Counter("pdserve_requests_total", "Requests by outcome", ["role", "outcome"])
time_to_first_token = prom.Histogram("pdserve_time_to_first_token_seconds",
                                     "Router: arrival to first token", buckets=LATENCY_BUCKETS)
inter_token_latency = prom.Histogram("pdserve_inter_token_latency_seconds",
                                     "Router: gap between streamed tokens (per token)",
                                     buckets=LATENCY_BUCKETS)
retries_total = prom.Counter("pdserve_retries_total", "Router: attempts beyond the first", ["reason"])
requests_running = prom.Gauge("pdserve_requests_running", "Requests in the running batch")
requests_waiting = prom.Gauge("pdserve_requests_waiting", "Requests queued")
kv_cache_usage = prom.Gauge("pdserve_kv_cache_usage_ratio", "Fraction of KV blocks in use")
free_kv_blocks = prom.Gauge("pdserve_free_kv_blocks", "KV blocks free (cached ones included)")
prefix_cache_hits = prom.Counter("pdserve_prefix_cache_hits_total",
                                 "Prompt tokens taken from the prefix cache")
kv_transfer_bytes = prom.Counter("pdserve_kv_transfer_bytes_total", "KV bytes moved", ["direction"])
kv_transfer_failures = prom.Counter("pdserve_kv_transfer_failures_total", "Failed KV transfers")
route_decisions = prom.Counter("pdserve_route_decisions_total",
                               "Router: route choices (prefill node, or prefill on the decode node) by policy and reason", ["policy", "reason"])
routed_cached_tokens = prom.Counter("pdserve_router_prefix_cache_hit_tokens_total",
                                    "Router: prompt tokens the chosen prefill node took from its cache")
index_lookup_seconds = prom.Histogram("pdserve_index_lookup_seconds",
                                      "Router: one prefix-index lookup in Redis",
                                      buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                               0.025, 0.05, 0.1, 0.5))
redis_up = prom.Gauge("pdserve_redis_up", "1 while Redis answers (router: prefix routing on)")
nodes_healthy = prom.Gauge("pdserve_nodes_healthy", "Router: nodes serving", ["role"])


def start_metrics_server(host: str, port: int, tls: Tls = Tls()) -> int:
    """Serves /metrics (over TLS when `tls` serves); returns the bound port (0: any free one)."""
    server, _ = prom.start_http_server(port, addr=host, certfile=tls.cert_file or None,
                                       keyfile=tls.key_file or None)
    return server.server_port


def update_engine_gauges(stats: dict) -> None:
    requests_running.set(stats["num_running"])
    requests_waiting.set(stats["num_waiting"])
    free_kv_blocks.set(stats["num_free_blocks"])
    kv_cache_usage.set(1.0 - stats["num_free_blocks"] / max(1, stats["num_kv_blocks"]))
