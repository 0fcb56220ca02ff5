"""Prefix-aware routing against round-robin and least-load, measured in one run.

Workload: 8 tenants, each with its own 512-token system prompt, 4 requests each (the system
prompt plus a 16-token user turn), shuffled, sent at a fixed request rate (open loop) to a
local cluster of 2 prefill + 1 decode nodes and a local redis-server. Each prefill node's KV
cache holds the prefixes of about 5 tenants, not all 8: where a tenant's requests go decides
whether its prefix is still cached. A fresh cluster per policy (cold caches).

Reported per policy: mean and p90 TTFT, the cached-token ratio (prompt tokens served from a
prefix cache over the achievable: the whole system prompt for every request of a tenant after
its first), and the routing reasons. Then the router's added latency per request for the
prefix lookup (hashing the prompt + one pipelined Redis round trip), median and p99.

Usage: python benchmarks/prefix_routing.py [--model smollm2-135m] [--rate 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.block_hash import block_hashes  # noqa: E402
from pdserve.engine.model_source import resolve_model  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.client import generate_request  # noqa: E402
from pdserve.cluster import Cluster  # noqa: E402
from pdserve.protos import pdserve_pb2_grpc as pb_grpc  # noqa: E402
from pdserve.router.prefix_index import PrefixIndex  # noqa: E402

POLICIES = ("prefix", "round_robin", "load")
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def workload(vocab: int, num_tenants: int, per_tenant: int, prefix_len: int, seed: int = 0):
    rng = random.Random(seed)
    systems = [[rng.randrange(100, vocab) for _ in range(prefix_len)] for _ in range(num_tenants)]
    requests = [(t, systems[t] + [rng.randrange(100, vocab) for _ in range(16)])
                for t in range(num_tenants) for _ in range(per_tenant)]
    rng.shuffle(requests)
    return requests


async def send_at_rate(address: str, requests, rate: float) -> list[tuple[float, int]]:
    """(TTFT seconds, cached tokens) per request; request i leaves at i / rate seconds."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)

        async def one(i: int, prompt: list[int]):
            await asyncio.sleep(i / rate)
            start, ttft, cached = time.perf_counter(), None, 0
            async for response in stub.Generate(generate_request(prompt, PARAMS), timeout=600):
                ttft = ttft or time.perf_counter() - start
                cached = response.usage.cached_tokens if response.HasField("usage") else cached
            return ttft, cached

        return await asyncio.gather(*(one(i, p) for i, (_, p) in enumerate(requests)))


def route_reasons(cluster: Cluster) -> dict[str, int]:
    url = f"http://127.0.0.1:{cluster.router.info['metrics_port']}/metrics"
    reasons = {}
    for line in urllib.request.urlopen(url).read().decode().splitlines():
        if line.startswith("pdserve_route_decisions_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            reasons[reason] = int(float(line.rsplit(" ", 1)[1]))
    return reasons


def run_policy(model: str, policy: str, requests, rate: float, num_kv_blocks: int, prefix_len: int,
               lookup_samples: int) -> dict:
    with Cluster(model, 2, 1, redis="local", prefill_args=["--num-kv-blocks", str(num_kv_blocks)],
                 router_args=["--policy", policy], log_level="WARNING").start(
                     progress=lambda m: print(f"[{policy}] {m}", file=sys.stderr)) as cluster:
        results = asyncio.run(send_at_rate(cluster.router_address, requests, rate))
        seen, achievable = set(), 0
        for tenant, _ in requests:
            achievable += prefix_len if tenant in seen else 0
            seen.add(tenant)
        ttft = sorted(r[0] for r in results)
        row = {"policy": policy, "ttft_mean_ms": 1e3 * statistics.mean(ttft),
               "ttft_p90_ms": 1e3 * ttft[int(0.9 * (len(ttft) - 1))],
               "cached_ratio": sum(r[1] for r in results) / achievable, "reasons": route_reasons(cluster)}
        if policy == "prefix":
            row["lookup"] = asyncio.run(lookup_latency(cluster.redis_url, model, requests, lookup_samples))
        return row


async def lookup_latency(redis_url: str, model: str, requests, samples: int) -> dict:
    """What the router adds per request: hash the prompt's blocks, look them up in Redis."""
    source = resolve_model(model)
    fingerprint = source.model_config().fingerprint(source.weights_id())
    index = PrefixIndex(redis_url, fingerprint)
    times, num_hits = [], 0
    try:
        for i in range(samples):
            prompt = requests[i % len(requests)][1]
            start = time.perf_counter()
            runs = await index.lookup(block_hashes(prompt[:-1], 16, fingerprint))
            times.append(time.perf_counter() - start)
            num_hits += bool(runs)
    finally:
        await index.close()
    times.sort()
    return {"median_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))],
            "blocks": len(requests[0][1]) // 16, "hit_fraction": num_hits / samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--per-tenant", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--num-kv-blocks", type=int, default=200,
                        help="per prefill node: about 5 tenants' prefixes of 33 blocks, not 8")
    parser.add_argument("--lookup-samples", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    vocab = resolve_model(args.model).model_config().vocab_size
    requests = workload(vocab, args.tenants, args.per_tenant, args.prefix_len)
    rows = []
    for policy in POLICIES:
        rows.append(run_policy(args.model, policy, requests, args.rate, args.num_kv_blocks,
                               args.prefix_len, args.lookup_samples))
        print(f"[{policy}] {json.dumps(rows[-1])}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    base = rows[0]
    print(f"\n{args.model}, CPU, 2 prefill + 1 decode, {args.tenants} tenants x {args.per_tenant} requests, "
          f"{args.prefix_len}-token system prompts, {args.rate} req/s")
    print(f"{'policy':<12} | {'TTFT mean ms':>12} | {'TTFT p90 ms':>11} | {'cached ratio':>12} | reasons")
    for r in rows:
        print(f"{r['policy']:<12} | {r['ttft_mean_ms']:12.0f} | {r['ttft_p90_ms']:11.0f} | "
              f"{r['cached_ratio']:12.2f} | {r['reasons']}")
    for r in rows[1:]:
        print(f"prefix vs {r['policy']}: TTFT mean {base['ttft_mean_ms'] / r['ttft_mean_ms']:.2f}x, "
              f"p90 {base['ttft_p90_ms'] / r['ttft_p90_ms']:.2f}x, cached tokens "
              f"{base['cached_ratio'] / max(r['cached_ratio'], 1e-9):.2f}x")
    lookup = base["lookup"]
    print(f"router's prefix lookup ({lookup['blocks']} blocks: hash + one Redis round trip): "
          f"median {lookup['median_ms']:.3f} ms, p99 {lookup['p99_ms']:.3f} ms, "
          f"{100 * lookup['hit_fraction']:.0f}% of lookups found a node "
          f"(target: cached ratio >= 0.85 for prefix)")


if __name__ == "__main__":
    main()
