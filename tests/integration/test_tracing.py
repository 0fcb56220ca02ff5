"""OpenTelemetry traces (service/tracing.py): a cluster of real processes (gateway, router, one
prefill and one decode node serving `dummy:tiny`, always disaggregated), each with
`--otlp-endpoint` naming a collector stand-in in this test: a gRPC server of the OTLP trace
service, from the opentelemetry-proto package's stubs, keeping what it is sent. One request
through the gateway is one trace with a span per hop, each the child of the hop that called it."""

import collections
import concurrent.futures
import threading

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pdserve.cluster import Cluster

from .serving import wait_for

MODEL = "dummy:tiny"
HOPS = ("gateway POST /v1/completions", "router Generate", "prefill Prefill", "kv transfer", "decode Decode")


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans, self.lock = [], threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector():
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    receiver = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def cluster(collector):
    otlp = ["--otlp-endpoint", collector[1]]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # the batch processor sends every 0.1 s
        with Cluster(MODEL, 1, 1, gateway_port=0, node_args=otlp, gateway_args=otlp,
                     router_args=["--disaggregation", "always", *otlp]) as c:
            yield c


def test_one_request_is_one_trace_with_a_span_per_hop(cluster, collector):
    receiver, _ = collector
    reply = httpx.post(f"{cluster.gateway_url}/completions", timeout=60, json={
        "model": MODEL, "prompt": [5, 6, 7, 8, 9], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200
    request_id = reply.json()["id"]

    def the_trace():
        with receiver.lock:
            roots = [s for _, s in receiver.spans if s.name == HOPS[0] and
                     any(a.value.string_value == request_id for a in s.attributes)]
            if not roots:
                return None
            trace = [(service, s) for service, s in receiver.spans if s.trace_id == roots[0].trace_id]
            return trace if {s.name for _, s in trace} >= set(HOPS) else None

    trace = wait_for(the_trace, timeout=30)
    assert trace, [s.name for _, s in receiver.spans]
    by_name = collections.defaultdict(list)
    for service, span in trace:
        by_name[span.name].append((service, span))
    assert all(len(by_name[hop]) == 1 for hop in HOPS), {hop: len(by_name[hop]) for hop in HOPS}
    (gateway_service, gateway), = by_name[HOPS[0]]
    assert gateway_service == "pdserve-gateway" and not gateway.parent_span_id  # the root
    parents = {HOPS[1]: gateway, HOPS[2]: by_name[HOPS[1]][0][1], HOPS[3]: by_name[HOPS[2]][0][1],
               HOPS[4]: by_name[HOPS[1]][0][1]}
    services = {HOPS[1]: "pdserve-router", HOPS[2]: "pdserve-prefill", HOPS[3]: "pdserve-prefill",
                HOPS[4]: "pdserve-decode"}
    for hop, parent in parents.items():
        service, span = by_name[hop][0]
        assert service == services[hop] and span.parent_span_id == parent.span_id, hop
        assert span.start_time_unix_nano <= span.end_time_unix_nano
