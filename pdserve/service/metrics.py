"""Prometheus metrics. Each process exports only the families its role measures (`ROLES`),
every sample labelled with the `model_name` it serves (`role_registry`). Where vLLM has a metric of
the same meaning its name is ours with `pdserve_` for `vllm:` (docs/metrics.md has the table);
the rest (KV transfer, routing, admission, the gateway) are our own.

The families are made unregistered, once per process; a role's registry takes its own.
Engine nodes' gauges and token counters are read from the engine's stats at scrape time
(`EngineStats`), so they are the engine's own cumulative counts, never a copy kept in step.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .tls import Tls

prom.disable_created_metrics()  # no `*_created` series beside every counter and histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def _counter(name: str, doc: str, labels=()) -> prom.Counter:
    return prom.Counter(name, doc, labels, registry=None)


def _gauge(name: str, doc: str, labels=()) -> prom.Gauge:
    return prom.Gauge(name, doc, labels, registry=None)


def _histogram(name: str, doc: str, buckets=LATENCY_BUCKETS, labels=()) -> prom.Histogram:
    return prom.Histogram(name, doc, labels, buckets=buckets, registry=None)


# ---- every server role ----------------------------------------------------------------------
requests_total = _counter("pdserve_requests_total", "Requests by outcome: ok, failed, invalid, cancelled",
                          ["role", "outcome"])

# ---- router: what a client sees (vLLM's request-level metrics) ---------------------------
time_to_first_token = _histogram("pdserve_time_to_first_token_seconds", "Arrival to first token")
inter_token_latency = _histogram("pdserve_inter_token_latency_seconds", "Gap between streamed tokens (per token)")
e2e_request_latency = _histogram("pdserve_e2e_request_latency_seconds", "Arrival to last token")
request_prompt_tokens = _histogram("pdserve_request_prompt_tokens", "Prompt tokens of each finished request",
                                   TOKEN_BUCKETS)
request_generation_tokens = _histogram("pdserve_request_generation_tokens",
                                       "Tokens generated for each finished request", TOKEN_BUCKETS)
request_success = _counter("pdserve_request_success", "Finished requests by finish reason (abort: cancelled)",
                           ["finished_reason"])
requests_in_flight = _gauge("pdserve_router_requests_in_flight", "Generate calls open now")
retries_total = _counter("pdserve_retries_total", "Attempts beyond the first", ["reason"])
route_decisions = _counter("pdserve_route_decisions_total",
                           "Route choices (prefill node, or prefill on the decode node) by policy and reason",
                           ["policy", "reason"])
routed_cached_tokens = _counter("pdserve_router_prefix_cache_hit_tokens_total",
                                "Prompt tokens the chosen prefill node took from its cache")
index_lookup_seconds = _histogram("pdserve_index_lookup_seconds", "One prefix-index lookup in Redis",
                                  (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))
redis_up = _gauge("pdserve_redis_up", "1 while Redis answers (prefix routing on)")
nodes_healthy = _gauge("pdserve_nodes_healthy", "Nodes serving", ["role"])

# ---- engine nodes: each finished request's phases here (vLLM's request-level times) ------
request_queue_time = _histogram("pdserve_request_queue_time_seconds", "Arrival to first scheduled")
request_prefill_time = _histogram("pdserve_request_prefill_time_seconds", "First scheduled to first token")
request_decode_time = _histogram("pdserve_request_decode_time_seconds", "First token (sampled or admitted) to the end")
request_inference_time = _histogram("pdserve_request_inference_time_seconds",
                                    "First scheduled (or admitted) to the end")
REQUEST_TIMES = [request_queue_time, request_prefill_time, request_decode_time, request_inference_time]

# ---- KV transfer ------------------------------------------------------------------------
kv_transfer_bytes = _counter("pdserve_kv_transfer_bytes", "KV bytes moved", ["direction"])
kv_transfer_failures = _counter("pdserve_kv_transfer_failures", "Failed KV transfers")
kv_transfers_in_place = _counter("pdserve_kv_transfers_in_place",
                                 "KV transfers a sender on this host wrote into the blocks itself (ipc connector)")
kv_transfer_seconds = _histogram("pdserve_kv_transfer_seconds",
                                 "A transfer's tail: from the prefill's answer (the first token) to its DONE sent")

# ---- decode node's admission queue ------------------------------------------------------
admission_queue_length = _gauge("pdserve_admission_queue_length", "Requests waiting for decode blocks")
admission_refused = _counter("pdserve_admission_refused", "Requests refused: the admission queue was full")

# ---- gateway: "request" is from the HTTP request's arrival to the gRPC call plus from the
# first gRPC answer to its first chunk written; "chunk" from each later gRPC answer to its SSE
# chunk written
http_requests = _counter("pdserve_http_requests", "Requests by path and status", ["path", "status"])
gateway_added = _histogram("pdserve_gateway_added_seconds", "Latency the gateway adds", (
    5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1), ["stage"])


class EngineStats(Collector):
    """An engine node's gauges and token counters, from the last `Engine.stats()` (set after
    every step by the engine thread; read whole at scrape time)."""

    KEYS = ("num_running", "num_waiting", "num_free_blocks", "num_kv_blocks", "num_prompt_tokens_computed",
            "num_generated_tokens", "num_prefix_cache_queries", "num_cached_tokens", "num_preemptions")

    def __init__(self):
        self.stats: dict | None = None

    def describe(self):
        return self._families(dict.fromkeys(self.KEYS, 0))

    def collect(self):
        return [] if self.stats is None else self._families(self.stats)

    @staticmethod
    def _families(s: dict):
        gauges = [("pdserve_num_requests_running", "Requests in the running batch", s["num_running"]),
                  ("pdserve_num_requests_waiting", "Requests waiting to be scheduled", s["num_waiting"]),
                  ("pdserve_kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1)",
                   1.0 - s["num_free_blocks"] / max(1, s["num_kv_blocks"])),
                  ("pdserve_free_kv_blocks", "KV blocks free (cached ones included)", s["num_free_blocks"])]
        counters = [("pdserve_prompt_tokens", "Prompt tokens computed (not taken from the prefix cache)",
                     s["num_prompt_tokens_computed"]),
                    ("pdserve_generation_tokens", "Tokens sampled", s["num_generated_tokens"]),
                    ("pdserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     s["num_prefix_cache_queries"]),
                    ("pdserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", s["num_cached_tokens"]),
                    ("pdserve_num_preemptions", "Requests preempted (to be recomputed)", s["num_preemptions"])]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


engine_stats = EngineStats()

ROUTER = [requests_total, time_to_first_token, inter_token_latency, e2e_request_latency, request_prompt_tokens,
          request_generation_tokens, request_success, requests_in_flight, retries_total, route_decisions,
          routed_cached_tokens, index_lookup_seconds, redis_up, nodes_healthy]
ROLES: dict[str, list[Collector]] = {
    "router": ROUTER,
    "prefill": [requests_total, engine_stats, *REQUEST_TIMES, kv_transfer_bytes, kv_transfer_failures,
                kv_transfer_seconds],
    "decode": [requests_total, engine_stats, *REQUEST_TIMES, kv_transfer_bytes, kv_transfer_failures,
               kv_transfers_in_place, admission_queue_length, admission_refused],
    "gateway": [http_requests, gateway_added],
}


class ModelNamed(Collector):
    """`collectors`' samples, each with a `model_name` label (`model_name()`: the gateway
    learns its name from the router after it started)."""

    def __init__(self, collectors: list[Collector], model_name: str | Callable[[], str]):
        self.collectors = collectors
        self.model_name = model_name if callable(model_name) else lambda: model_name

    def collect(self):
        name = self.model_name() or ""
        for collector in self.collectors:
            for family in collector.collect():
                family.samples = [s._replace(labels={**s.labels, "model_name": name}) for s in family.samples]
                yield family


def role_registry(role: str, model_name: str | Callable[[], str]) -> CollectorRegistry:
    """A registry of what `role` exports, labelled with `model_name`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ModelNamed(ROLES[role], model_name))
    return registry


def family_names(role: str) -> set[str]:
    """The families `role` exports, named as its /metrics declares them (a counter's `_total`)."""
    return {family.name + ("_total" if family.type == "counter" else "")
            for collector in ROLES[role] for family in collector.describe()}


def start_metrics_server(host: str, port: int, registry: CollectorRegistry, tls: Tls = Tls()) -> int:
    """Serves /metrics (over TLS when `tls` serves); returns the bound port (0: any free one)."""
    server, _ = prom.start_http_server(port, addr=host, registry=registry, certfile=tls.cert_file or None,
                                       keyfile=tls.key_file or None)
    return server.server_port


def count_unfinished(role: str) -> None:
    """From the `finally` of a call that did not finish: `cancelled` when the caller left (the
    call is cancelled or its stream closed), else `failed`."""
    error = sys.exc_info()[1]
    cancelled = error is None or isinstance(error, (asyncio.CancelledError, GeneratorExit))
    requests_total.labels(role, "cancelled" if cancelled else "failed").inc()


def observe_request_times(times) -> None:
    """A finished request's RequestTimes (engine/request.py): each phase that was this node's."""
    if times is None:
        return
    for histogram, seconds in zip(REQUEST_TIMES, times):
        if seconds is not None:
            histogram.observe(seconds)


def update_engine_stats(stats: dict) -> None:
    engine_stats.stats = stats
