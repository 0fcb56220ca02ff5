"""The cost of the HTTP gateway, measured in one run: the same streamed requests through the
gateway (OpenAI API, SSE) and straight to the router's gRPC API, 1 and 16 at a time, on a
local cluster (1 prefill + 1 decode node). Clients: one asyncio thread each (aiohttp for
HTTP, grpc.aio for gRPC). Reported at the median over requests: TTFT and inter-token latency
(ITL, (last token time - first) / (tokens - 1)); the sides alternate, the best of `--repeat`
runs by throughput is kept. Targets: the gateway adds < 5 ms to TTFT and < 1 ms per token.

Usage: python benchmarks/gateway.py [--model smollm2-135m] [--max-tokens 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model_source import resolve_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.client import generate_request  # noqa: E402
from pdserve.cluster import Cluster  # noqa: E402
from protos import pdserve_pb2_grpc as pb_grpc  # noqa: E402


def make_prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randrange(64, 257))] for _ in range(n)]


def summarize(records, wall: float) -> dict:
    """records: (ttft s, itl s, tokens) per request."""
    return {"ttft_ms": 1e3 * statistics.median(r[0] for r in records),
            "itl_ms": 1e3 * statistics.median(r[1] for r in records),
            "tok_s": sum(r[2] for r in records) / wall}


async def via_grpc(address: str, prompts, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)

        async def one(prompt):
            start, first, last, count = time.perf_counter(), None, None, 0
            async for response in stub.Generate(generate_request(prompt, params), timeout=600):
                last = time.perf_counter()
                first, count = first or last, count + len(response.token_ids)
            return first - start, (last - first) / max(1, count - 1), count

        start = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return summarize(records, time.perf_counter() - start)


async def via_http(url: str, model: str, prompts, max_tokens: int) -> dict:
    async with aiohttp.ClientSession() as session:

        async def one(prompt):
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            start, first, last, count = time.perf_counter(), None, None, 0
            async with session.post(f"{url}/completions", json=body) as reply:
                assert reply.status == 200, await reply.text()
                async for line in reply.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        last = time.perf_counter()
                        first = first or last
                    elif chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
            return first - start, (last - first) / max(1, count - 1), count

        start = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return summarize(records, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    vocab = resolve_model(args.model).model_config().vocab_size
    rows = []
    with Cluster(args.model, 1, 1, gateway_port=0, log_level="WARNING").start(
            progress=lambda m: print(m, file=sys.stderr)) as cluster:
        model = cluster.gateway.info["model"]
        for concurrency in (1, 16):
            prompts = make_prompts(concurrency, vocab, seed=concurrency)
            asyncio.run(via_http(cluster.gateway_url, model, prompts[:1], 2))  # warm up both paths
            asyncio.run(via_grpc(cluster.router_address, prompts[:1], 2))
            best = {}
            for _ in range(args.repeat):
                for side, run in (("grpc", lambda: via_grpc(cluster.router_address, prompts, args.max_tokens)),
                                  ("http", lambda: via_http(cluster.gateway_url, model, prompts, args.max_tokens))):
                    result = asyncio.run(run())
                    if side not in best or result["tok_s"] > best[side]["tok_s"]:
                        best[side] = result
            rows.append({"concurrency": concurrency, **best,
                         "ttft_added_ms": best["http"]["ttft_ms"] - best["grpc"]["ttft_ms"],
                         "itl_added_ms": best["http"]["itl_ms"] - best["grpc"]["itl_ms"]})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"\n{args.model}, CPU, {args.max_tokens} tokens per request; medians over requests")
    print(f"{'conc':>4} | {'path':<12} | {'TTFT ms':>8} | {'ITL ms':>7} | {'tok/s':>7}")
    for row in rows:
        for side, name in (("grpc", "router gRPC"), ("http", "gateway HTTP")):
            r = row[side]
            print(f"{row['concurrency']:>4} | {name:<12} | {r['ttft_ms']:8.1f} | {r['itl_ms']:7.2f} | {r['tok_s']:7.1f}")
        print(f"{'':>4} | gateway adds {row['ttft_added_ms']:+.2f} ms to TTFT (target < 5), "
              f"{row['itl_added_ms']:+.2f} ms per token (target < 1)")


if __name__ == "__main__":
    main()
