"""Helpers for the tests that run real clusters: stream, stats, waiting."""

from __future__ import annotations

import concurrent.futures
import random
import re
import signal
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.engine.sampling_params import SamplingParams
from pdserve.client import generate_request, stream
from pdserve.protos import pdserve_pb2 as pb
from pdserve.protos import pdserve_pb2_grpc as pb_grpc

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def generate(address: str, prompt, params: SamplingParams = GREEDY, api_key: str | None = None, **kw):
    """(all token ids, the last response, the number of messages) of one streamed request."""
    tokens, last, count = [], None, 0
    for response in stream(address, generate_request(prompt, params, **kw), timeout=120, api_key=api_key):
        tokens += response.token_ids
        last, count = response, count + 1
    return tokens, last, count


def random_prompts(seed: int, lengths, vocab_size: int = 512) -> list[list[int]]:
    """Token-id prompts of these lengths (ids from 3: clear of dummy models' special ids)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


def running_decode(cluster):
    """A live decode node with a running request, or None."""
    return next((d for d in cluster.decode if d.popen.poll() is None and node_stats(d).num_running), None)


def generate_killing_its_decode_node(cluster, prompt, params: SamplingParams):
    """`generate`, with the decode node that runs the request SIGKILLed mid-stream."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(generate, cluster.router_address, prompt, params)
        victim = wait_for(lambda: running_decode(cluster), timeout=30, interval=0.01)
        assert victim is not None
        victim.popen.send_signal(signal.SIGKILL)
        return future.result(timeout=120)


def node_stats(process) -> pb.NodeStats:
    role = process.info["role"]
    with process.channel() as channel:
        stub = (pb_grpc.PrefillServiceStub if role == "prefill" else pb_grpc.DecodeServiceStub)(channel)
        return stub.GetStats(pb.StatsRequest(), timeout=5, metadata=process.metadata)


def health(address: str) -> str:
    """SERVING, NOT_SERVING, or UNREACHABLE."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def all_blocks_free(cluster) -> bool:
    for p in cluster.prefill + cluster.decode:
        if p.popen.poll() is not None:
            continue
        s = node_stats(p)
        if s.num_free_blocks != s.num_kv_blocks or s.num_running or s.num_reserved or s.num_waiting:
            return False
    return True


def metric(process, name: str, **labels) -> float:
    """The sum of a Prometheus metric's samples (those with `labels`) on a process's /metrics."""
    url = f"http://127.0.0.1:{process.info['metrics_port']}/metrics"
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        match = re.match(rf"{name}(\{{.*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total
