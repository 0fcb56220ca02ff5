"""What metrics and tracing cost the router and the gateway (issue 33), measured in one run.

1. In this process, the recording itself: per streamed chunk (the router's TTFT/ITL
   histograms), per request (the router's finish: counters and histograms; the gateway's
   counter and histogram), and per request with tracing on (a span started, its context put
   in metadata, the span ended; spans go to a collector stand-in, an OTLP/gRPC server here).
2. On a local cluster (gateway, router, 1 prefill + 1 decode node, `dummy:tiny`): the same
   workload through the gateway twice, tracing off then on, and each time the CPU seconds the
   router and the gateway processes spent per request (/proc/<pid>/stat).

The ratios: the recording's cost per request (its chunks included) against the router's CPU
per request with tracing off (target < 5%), and each process's CPU per request on / off.

Usage: python benchmarks/observability_cost.py [--requests 160] [--concurrency 8] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
import timeit
from pathlib import Path

import grpc
import httpx
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.cluster import Cluster  # noqa: E402
from pdserve.engine.request import FinishReason  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.router import request_metrics  # noqa: E402
from pdserve.router.progress import Progress  # noqa: E402
from pdserve.service import metrics  # noqa: E402
from pdserve.service.tracing import Tracing  # noqa: E402

MODEL = "dummy:tiny"


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.num_spans = 0

    def Export(self, request, context):
        self.num_spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def start_collector() -> tuple[grpc.Server, Sink, str]:
    server, sink = grpc.server(concurrent.futures.ThreadPoolExecutor(2)), Sink()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, sink, f"127.0.0.1:{port}"


def per_call(fn, number: int = 20000) -> float:
    """Seconds per call of `fn`, the best of 5 repeats."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def recording_costs(endpoint: str) -> dict[str, float]:
    progress = Progress(list(range(32)), SamplingParams(max_tokens=32))
    progress.first_at = progress.last_at = time.monotonic()
    progress.sent = list(range(32))
    tracing = Tracing("pdserve-bench", endpoint)
    metadata = (("pdserve-cluster-secret", "x" * 32),)

    def traced_request():
        span = tracing.start("router Generate", metadata, request_id="bench")
        tracing.metadata(span)
        span.end()

    costs = {"chunk: router metrics": per_call(lambda: request_metrics.on_tokens(progress, 1, time.monotonic())),
             "request: router metrics": per_call(lambda: request_metrics.on_finished(
                 progress, FinishReason.LENGTH, time.monotonic())),
             "request: gateway metrics": per_call(lambda: (
                 metrics.http_requests.labels("/v1/completions", "200").inc(),
                 metrics.gateway_added.labels("request").observe(1e-4))),
             "request: a traced hop": per_call(traced_request, 300)}  # 5 x 300 spans: within the export queue
    tracing.close()
    return costs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_workload(cluster: Cluster, num_requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    """CPU seconds per request of the router and the gateway over the workload."""
    url = f"{cluster.gateway_url}/completions"

    def one(i: int) -> None:
        reply = httpx.post(url, timeout=120, json={"model": MODEL, "prompt": [3 + (i * 7 + k) % 500 for k in range(32)],
                                                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                                                   "stream": True})
        assert reply.status_code == 200, reply.text

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up
        before = {p.name: cpu_seconds(p.popen.pid) for p in (cluster.router, cluster.gateway)}
        list(pool.map(one, range(num_requests)))
        after = {p.name: cpu_seconds(p.popen.pid) for p in (cluster.router, cluster.gateway)}
    return {name: (after[name] - before[name]) / num_requests for name in before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    server, sink, endpoint = start_collector()
    costs = recording_costs(endpoint)
    per_process = {}
    for mode in ("off", "on", "off again"):
        otlp = ["--otlp-endpoint", endpoint] if mode == "on" else []  # off, on, off: drift shows
        with Cluster(MODEL, 1, 1, gateway_port=0, node_args=otlp, gateway_args=otlp,
                     router_args=["--disaggregation", "always", *otlp]) as cluster:
            per_process[mode] = run_workload(cluster, args.requests, args.concurrency, args.max_tokens)
    server.stop(0)
    print(f"{args.requests} streamed requests of {args.max_tokens} tokens through the gateway, "
          f"{args.concurrency} at a time, {MODEL}; {sink.num_spans} spans reached the collector")
    print("| recording | us per call |")
    print("|---|---|")
    for what, seconds in costs.items():
        print(f"| {what} | {seconds * 1e6:.2f} |")
    router_off = per_process["off"]["router"]
    metrics_per_request = costs["request: router metrics"] + args.max_tokens * costs["chunk: router metrics"]
    traced = metrics_per_request + costs["request: a traced hop"]
    print(f"router CPU per request, tracing off: {router_off * 1e3:.2f} ms; its metrics ({args.max_tokens} chunks "
          f"and the finish) {metrics_per_request * 1e6:.0f} us = {100 * metrics_per_request / router_off:.2f}% of it; "
          f"with its span {100 * traced / router_off:.2f}%")
    print("| process | CPU ms/request, tracing off | on | off again | on / mean of the offs |")
    print("|---|---|---|---|---|")
    for name in per_process["off"]:
        off, on, again = (per_process[m][name] for m in ("off", "on", "off again"))
        print(f"| {name} | {off * 1e3:.2f} | {on * 1e3:.2f} | {again * 1e3:.2f} | {2 * on / (off + again):.3f} |")


if __name__ == "__main__":
    main()
