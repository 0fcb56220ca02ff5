"""The cost of disaggregation, measured in one run on the same prompts:

  1. end to end: 1 and 16 concurrent requests through a local cluster (router, one prefill
     and one decode node, real processes on loopback; the client is one asyncio thread on one
     channel) against the in-process Engine. TTFT, mean inter-token latency (ITL) per stream,
     output tokens/s, wall time per output token (all streams together; also while every
     stream is decoding, when no prefill shares the cores). Each overhead is disaggregated
     minus in-process, taken in each round (engine, cluster, cluster, engine: a drift of the
     machine's speed that is linear over the round cancels) and reported as the median over
     rounds: this machine's speed drifts by tens of percent between minutes. Also
     the CPU time each process spent per output token (from /proc): where the overhead goes.
  2. KV transfer: the TCP connector (frames, CRC32C on both sides, writes into the cache)
     against a plain socket sending the same bytes in the same layer-sized chunks.

Usage: python benchmarks/disagg.py [--model smollm2-135m] [--max-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import json
import math
import random
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.model_source import resolve_model  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.kv_transfer.connector import KVTicket  # noqa: E402
from pdserve.kv_transfer.receiver import KVSocketReceiver  # noqa: E402
from pdserve.kv_transfer.tcp_sender import TcpKVSender  # noqa: E402
from pdserve.client import generate_request  # noqa: E402
from pdserve.cluster import Cluster  # noqa: E402
from pdserve.protos import pdserve_pb2_grpc as pb_grpc  # noqa: E402


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randrange(64, 257))] for _ in range(n)]


def summarize(records, wall: float) -> dict:
    """records: per request (start, [(arrival time, num tokens) per message]), times in seconds.

    steady_ms_per_token: wall time per output token while every request is decoding (from the
    last first token to the first last token): no prefill runs then, so what differs between
    the sides is the serving path itself, not prefill work sharing the cores with decode."""
    firsts = [arrivals[0][0] for _, arrivals in records]
    lasts = [arrivals[-1][0] for _, arrivals in records]
    counts = [sum(n for _, n in arrivals) for _, arrivals in records]
    itl = [(last - first) / (count - 1) for first, last, count in zip(firsts, lasts, counts) if count > 1]
    window = (max(firsts), min(lasts))
    steady = sum(n for _, arrivals in records for t, n in arrivals if window[0] < t <= window[1])  # 0: no such time
    return {"ttft_ms": 1e3 * statistics.mean(f - start for f, (start, _) in zip(firsts, records)),
            "itl_ms": 1e3 * statistics.mean(itl), "tok_s": sum(counts) / wall,
            "steady_ms_per_token": 1e3 * (window[1] - window[0]) / steady if steady else float("nan")}


def run_engine(engine: Engine, prompts, params) -> dict:
    engine.kv.pool.reset_prefix_cache()
    start, cpu_start = time.perf_counter(), time.process_time()
    ids = [engine.add_request(p, params) for p in prompts]
    arrivals = {i: [] for i in ids}
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.new_token_ids:
                arrivals[o.request_id].append((now, len(o.new_token_ids)))
    wall = time.perf_counter() - start
    result = summarize([(start, arrivals[i]) for i in ids], wall)
    num_tokens = sum(n for a in arrivals.values() for _, n in a)
    result["cpu_ms_per_token"] = {"engine": 1e3 * (time.process_time() - cpu_start) / num_tokens}
    return result


def run_cluster(address: str, prompts, params) -> dict:
    return asyncio.run(_run_cluster(address, prompts, params))


async def _run_cluster(address: str, prompts, params) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RouterServiceStub(channel)

        async def one(prompt):
            start, arrivals = time.perf_counter(), []
            async for response in stub.Generate(generate_request(prompt, params), timeout=600):
                if response.token_ids:
                    arrivals.append((time.perf_counter(), len(response.token_ids)))
            return start, arrivals

        start = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return summarize(records, time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cluster_measured(cluster: Cluster, prompts, params) -> dict:
    """run_cluster plus the CPU milliseconds each process spent per output token."""
    pids = {p.name: p.info["pid"] for p in cluster.processes} | {"client": os.getpid()}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = run_cluster(cluster.router_address, prompts, params)
    num_tokens = len(prompts) * params.max_tokens
    result["cpu_ms_per_token"] = {name: 1e3 * (cpu_seconds(pid) - before[name]) / num_tokens
                                  for name, pid in pids.items()}
    return result


def end_to_end(model: str, max_tokens: int, repeat: int) -> list[dict]:
    engine = Engine(model=model)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rows = []
    with Cluster(model, 1, 1, log_level="WARNING").start(progress=lambda m: print(m, file=sys.stderr)) as cluster:
        for concurrency in (1, 16):
            prompts = make_prompts(concurrency, vocab, seed=concurrency)
            run_cluster(cluster.router_address, prompts[:1], SamplingParams(max_tokens=4))  # warm up
            engine_runs, cluster_runs = [], []
            for _ in range(repeat):  # a round: engine, cluster, cluster, engine (see _overhead)
                engine_runs.append(run_engine(engine, prompts, params))
                cluster_runs += [run_cluster_measured(cluster, prompts, params) for _ in range(2)]
                engine_runs.append(run_engine(engine, prompts, params))
            rows.append({"concurrency": concurrency, "engine": _median_run(engine_runs),
                         "disagg": _median_run(cluster_runs),
                         **{name: _overhead(engine_runs, cluster_runs, key) for name, key in OVERHEADS.items()}})
    return rows


# overheads of disaggregation, each disaggregated minus in-process (ms)
OVERHEADS = {
    "itl": lambda r: r["itl_ms"],  # per stream: the gap a client sees between its tokens
    "per_token": lambda r: 1e3 / r["tok_s"],  # wall time per output token, all streams together
    "steady_per_token": lambda r: r["steady_ms_per_token"],  # the same with every stream decoding
}


def _overhead(engine_runs, cluster_runs, key) -> dict:
    """The difference in each round (two runs a side, engine ones around cluster ones: a drift
    of the machine's speed that is linear over the round cancels), and its median over rounds."""
    pairs = lambda runs: [(key(a) + key(b)) / 2 for a, b in zip(runs[::2], runs[1::2])]  # noqa: E731
    rounds = sorted(d for e, c in zip(pairs(engine_runs), pairs(cluster_runs)) if not math.isnan(d := c - e))
    return {"median_ms": statistics.median(rounds) if rounds else math.nan, "rounds_ms": rounds}


def _median_run(runs: list[dict]) -> dict:
    """The run of median throughput."""
    return sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]


def kv_transfer(num_tokens: int, num_layers: int, kv_heads: int, head_dim: int, repeat: int) -> dict:
    block_size = 16
    num_blocks = -(-num_tokens // block_size)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(num_layers)]
    layers = [torch.randn(2, *shape) for _ in range(num_layers)]
    receiver, sender = KVSocketReceiver(caches), TcpKVSender()
    total = sum(t.numel() * t.element_size() for t in layers)

    def connector_once() -> float:
        ticket = KVTicket(uuid.uuid4().hex, receiver.endpoint, tuple(range(num_blocks)), block_size,
                          num_layers, kv_heads, head_dim, "float32", 0.0, "bench")
        done = threading.Event()
        receiver.expect(ticket, lambda result: done.set() if result.ok else None)
        start = time.perf_counter()
        for i, kv in enumerate(layers):
            sender.send_layer(ticket, i, kv)
        sender.finish(ticket, 0)
        assert done.wait(60), "transfer failed"
        return time.perf_counter() - start

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    payloads = [kv.numpy().view("uint8").reshape(-1) for kv in layers]

    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    client = socket.create_connection(("127.0.0.1", port))
    while not accepted:
        time.sleep(0.01)
    counter = {"n": 0}

    def plain_once() -> float:
        # the receiver counts bytes; the sender waits until all of them arrived
        expected = counter["n"] + total
        start = time.perf_counter()
        for p in payloads:
            client.sendall(p)
        while counter["n"] < expected:
            time.sleep(0)
        return time.perf_counter() - start

    def count_receiver(conn):
        buffer = memoryview(bytearray(1 << 22))
        while (n := conn.recv_into(buffer)) > 0:
            counter["n"] += n

    threading.Thread(target=count_receiver, args=(accepted[0],), daemon=True).start()
    connector_once(), plain_once()  # warm up (connections, buffers)
    best_tcp = best_plain = float("inf")
    for _ in range(repeat):
        best_tcp = min(best_tcp, connector_once())
        best_plain = min(best_plain, plain_once())
    sender.close(), receiver.close(), client.close()
    gb = total / 1e9
    return {"bytes": total, "connector_gb_s": gb / best_tcp, "socket_gb_s": gb / best_plain,
            "ratio": best_plain / best_tcp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="rounds (each runs both sides twice)")
    parser.add_argument("--kv-tokens", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = end_to_end(args.model, args.max_tokens, args.repeat)
    mc = resolve_model(args.model).model_config()
    kv = kv_transfer(args.kv_tokens, mc.num_layers, mc.num_kv_heads, mc.head_dim, repeat=5)
    if args.json:
        Path(args.json).write_text(json.dumps({"end_to_end": rows, "kv_transfer": kv}, indent=2))
    print(f"\n{args.model}, CPU, {args.max_tokens} new tokens per request, prompts of 64-256 tokens")
    print(f"{'conc':>4} | {'side':<8} | {'TTFT ms':>8} | {'ITL ms':>7} | {'tok/s':>7} | {'ms/token':>8} | "
          f"{'steady ms/token':>15}")
    for row in rows:
        for side in ("engine", "disagg"):
            r = row[side]
            print(f"{row['concurrency']:>4} | {side:<8} | {r['ttft_ms']:8.1f} | {r['itl_ms']:7.2f} | {r['tok_s']:7.1f} | "
                  f"{1e3 / r['tok_s']:8.2f} | {r['steady_ms_per_token']:15.2f}")
        for name, label in (("itl", "ITL (per stream)"), ("per_token", "wall time per output token"),
                            ("steady_per_token", "the same, every stream decoding")):
            rounds = ", ".join(f"{x:+.1f}" for x in row[name]["rounds_ms"])
            print(f"{'':>4} | overhead, {label}: {row[name]['median_ms']:+.2f} ms  (rounds: {rounds})")
        cpu = row["engine"]["cpu_ms_per_token"] | row["disagg"]["cpu_ms_per_token"]
        print(f"{'':>4} | CPU ms per output token: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
    print(f"\nKV transfer of {kv['bytes'] / 1e6:.0f} MB ({args.kv_tokens} tokens x {mc.num_layers} layers, fp32): "
          f"connector {kv['connector_gb_s']:.2f} GB/s, plain socket {kv['socket_gb_s']:.2f} GB/s, "
          f"ratio {kv['ratio']:.2f}x (target >= 0.6)")


if __name__ == "__main__":
    main()
