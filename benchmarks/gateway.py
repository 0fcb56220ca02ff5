"""The cost of the HTTP gateway, measured in one run: streamed requests through the gateway
(OpenAI API, SSE) and straight to the router's gRPC API, on a local cluster (1 prefill + 1
decode node), 1 and 16 concurrent streams on each path.

The two paths run at the same time, in the same decode batches: c streams through the
gateway and c through gRPC, with prompts of pairwise equal lengths (different tokens, so no
prefix is shared). On a small shared CPU, step times drift by tens of percent from run to
run; side by side, both paths see the same steps and the difference is the gateway's alone.
Requests leave in pairs 50 ms apart, which of the pair goes first alternating, so that both
paths hold the same places in the prefill queue.
Reported at the median over requests and `--repeat` rounds: TTFT and inter-token latency
(ITL, (last token time - first) / (tokens - 1)). Clients: aiohttp and grpc.aio on one asyncio
loop. Targets: the gateway adds < 5 ms to TTFT and < 1 ms per token.

TTFT at 16 streams moves by tens of ms with each request's place in the prefill queue, more
than the target can be told apart from. So the gateway also reports what it adds itself
(`pdserve_gateway_added_seconds`: arrival to gRPC call plus first answer to first chunk
written; each later answer to its chunk written), read as medians from its histogram.

Usage: python benchmarks/gateway.py [--model smollm2-135m] [--max-tokens 64] [--repeat 5]
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
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.model_source import resolve_model  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.client import generate_request  # noqa: E402
from pdserve.cluster import Cluster  # noqa: E402
from pdserve.protos import pdserve_pb2_grpc as pb_grpc  # noqa: E402


def make_prompt_pairs(n: int, vocab: int, seed: int) -> tuple[list, list]:
    """Two lists of n prompts, pairwise of the same length, sharing no prefix."""
    rng = random.Random(seed)
    lengths = [rng.randrange(64, 257) for _ in range(n)]
    return tuple([[rng.randrange(100, vocab) for _ in range(k)] for k in lengths] for _ in range(2))


def summarize(records) -> dict:
    """records: (ttft s, itl s, tokens) per request."""
    return {"ttft_ms": 1e3 * statistics.median(r[0] for r in records),
            "itl_ms": 1e3 * statistics.median(r[1] for r in records), "num_requests": len(records)}


async def via_grpc(address: str, prompts, max_tokens: int, delays) -> list[tuple]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)

        async def one(prompt, delay):
            await asyncio.sleep(delay)
            start, first, last, count = time.perf_counter(), None, None, 0
            async for response in stub.Generate(generate_request(prompt, params), timeout=600):
                last = time.perf_counter()
                first, count = first or last, count + len(response.token_ids)
            return first - start, (last - first) / max(1, count - 1), count

        return await asyncio.gather(*(one(p, d) for p, d in zip(prompts, delays)))


async def via_http(url: str, model: str, prompts, max_tokens: int, delays) -> list[tuple]:
    async with aiohttp.ClientSession() as session:

        async def one(prompt, delay):
            await asyncio.sleep(delay)
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

        return await asyncio.gather(*(one(p, d) for p, d in zip(prompts, delays)))


def gateway_histogram(url: str) -> dict[str, list[tuple[float, float]]]:
    """stage -> cumulative (bucket upper bound, count) of pdserve_gateway_added_seconds."""
    import urllib.request

    text = urllib.request.urlopen(url.removesuffix("/v1") + "/metrics").read().decode()
    buckets: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "pdserve_gateway_added_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets.setdefault(sample.labels["stage"], []).append(
                        (float(sample.labels["le"]), sample.value))
    return buckets


def median_bound_ms(before: list, after: list) -> float:
    """The smallest bucket bound (ms) holding at least half of the observations in between."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(sorted(after), sorted(before or [(0, 0)] * len(after)))]
    total = counts[-1][1]
    return next(1e3 * le for le, n in counts if n >= total / 2) if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    vocab = resolve_model(args.model).model_config().vocab_size
    rows = []
    with Cluster(args.model, 1, 1, gateway_port=0, log_level="WARNING").start(
            progress=lambda m: print(m, file=sys.stderr)) as cluster:
        model = cluster.gateway.info["model"]

        async def side_by_side(http_prompts, grpc_prompts, max_tokens, round_=0):
            # pair i leaves at 50 ms * i; the second of the pair 25 ms later, alternating
            http_delays = [0.05 * i + (0.025 if (i + round_) % 2 else 0) for i in range(len(http_prompts))]
            grpc_delays = [0.05 * i + (0 if (i + round_) % 2 else 0.025) for i in range(len(grpc_prompts))]
            return await asyncio.gather(
                via_http(cluster.gateway_url, model, http_prompts, max_tokens, http_delays),
                via_grpc(cluster.router_address, grpc_prompts, max_tokens, grpc_delays))

        for concurrency in (1, 16):
            records = {"http": [], "grpc": []}
            asyncio.run(side_by_side(*make_prompt_pairs(1, vocab, seed=0), 2))  # warm up
            before = gateway_histogram(cluster.gateway_url)
            for round_ in range(args.repeat):
                a, b = make_prompt_pairs(concurrency, vocab, seed=100 * concurrency + round_)
                http, grpc_ = asyncio.run(side_by_side(a, b, args.max_tokens, round_))
                records["http"] += http
                records["grpc"] += grpc_
            http, grpc_ = summarize(records["http"]), summarize(records["grpc"])
            after = gateway_histogram(cluster.gateway_url)
            added = {stage: median_bound_ms(before.get(stage), after[stage]) for stage in after}
            rows.append({"concurrency": concurrency, "http": http, "grpc": grpc_,
                         "gateway_added_median_ms_at_most": added,
                         "ttft_added_ms": http["ttft_ms"] - grpc_["ttft_ms"],
                         "itl_added_ms": http["itl_ms"] - grpc_["itl_ms"]})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"\n{args.model}, CPU, {args.max_tokens} tokens per request, both paths side by side; "
          f"medians over requests of {args.repeat} rounds")
    print(f"{'conc':>4} | {'path':<12} | {'TTFT ms':>8} | {'ITL ms':>7} | {'requests':>8}")
    for row in rows:
        for side, name in (("grpc", "router gRPC"), ("http", "gateway HTTP")):
            r = row[side]
            print(f"{row['concurrency']:>4} | {name:<12} | {r['ttft_ms']:8.1f} | {r['itl_ms']:7.2f} | "
                  f"{r['num_requests']:>8}")
        print(f"{'':>4} | gateway adds {row['ttft_added_ms']:+.2f} ms to TTFT (target < 5), "
              f"{row['itl_added_ms']:+.2f} ms per token (target < 1), seen from the clients")
        added = row["gateway_added_median_ms_at_most"]
        print(f"{'':>4} | in the gateway, median: first chunk <= {added['request']:.2f} ms, "
              f"each later chunk <= {added['chunk']:.2f} ms")


if __name__ == "__main__":
    main()
