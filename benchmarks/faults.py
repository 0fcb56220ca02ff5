"""Issue 32's fault table, measured in one run: each fault injected into a live cluster (two
prefill and two decode nodes serving SmolLM2-135M with a local Redis, real processes) while
streams run, then, per fault: the streams affected, tokens lost or duplicated (each stream's
tokens against the in-process engine's greedy answer to the same prompt), the longest gap a
client saw between two messages of one stream, and errors.

Faults, after a baseline round with none (on a small CPU the longest gap of an undisturbed
stream is already seconds: prefills of other prompts share the cores): kill -9 of the decode node that runs streams; kill -9 of a prefill node while prompts
are being prefilled; Redis killed and restarted; SIGTERM (drain) of a decode node; SIGSTOP of
a decode node (hung; SIGCONT after the router's stream timeout); clients that leave mid-stream
(the check there: every block of every node free afterwards). A killed node is restarted
before the next fault.

Usage: python benchmarks/faults.py [--streams 8] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import signal
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.client import generate_request, stream  # noqa: E402
from pdserve.cluster import Cluster  # noqa: E402
from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.protos import pdserve_pb2 as pb  # noqa: E402
from pdserve.protos import pdserve_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "smollm2-135m"


def stats(process) -> pb.NodeStats:
    with process.channel() as channel:
        stub = (pb_grpc.PrefillServiceStub if process.role == "prefill" else pb_grpc.DecodeServiceStub)(channel)
        return stub.GetStats(pb.StatsRequest(), timeout=5, metadata=process.metadata)


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def run_stream(address: str, prompt: list[int], params: SamplingParams, leave_after: int | None = None):
    """(tokens, the longest gap between two messages in s (the first token's wait is TTFT, not
    a gap), error or None)."""
    tokens, last, gap = [], None, 0.0
    try:
        call = stream(address, generate_request(prompt, params), timeout=300)
        for response in call:
            now = time.monotonic()
            gap, last = max(gap, now - last) if last is not None else gap, now
            tokens += response.token_ids
            if leave_after is not None and len(tokens) >= leave_after:
                call.close()
                break
        return tokens, gap, None
    except grpc.RpcError as e:
        return tokens, gap, f"{e.code().name}: {e.details()}"


def busy_decode(cluster):
    return next((d for d in cluster.decode if d.popen.poll() is None and stats(d).num_running), None)


def busy_prefill(cluster):
    return next((p for p in cluster.prefill if p.popen.poll() is None and working(stats(p))), None)


def working(s: pb.NodeStats) -> bool:
    return bool(s.num_running or s.num_waiting)


def all_free(s: pb.NodeStats) -> bool:
    return s.num_free_blocks == s.num_kv_blocks


def faults(cluster: Cluster, stream_timeout_s: float):
    """name -> the action that injects it once streams run (it returns what to undo after)."""
    def kill(find):
        def act():
            victim = wait_until(lambda: find(cluster))
            victim.popen.send_signal(signal.SIGKILL)
            return lambda: cluster.restart(victim.name)
        return act

    def redis():
        cluster.local_redis.stop(kill=True)
        time.sleep(1.0)
        cluster.local_redis.start()
        return lambda: None

    def drain():
        victim = wait_until(lambda: busy_decode(cluster))
        victim.popen.send_signal(signal.SIGTERM)
        return lambda: (victim.popen.wait(60), cluster.restart(victim.name))

    def hang():
        victim = wait_until(lambda: busy_decode(cluster))
        victim.popen.send_signal(signal.SIGSTOP)
        time.sleep(stream_timeout_s + 2.0)
        victim.popen.send_signal(signal.SIGCONT)
        return lambda: None

    return {"none (the baseline: the same load undisturbed)": lambda: (lambda: None),
            "decode node kill -9 mid-stream": kill(busy_decode),
            "prefill node kill -9 while prefilling": kill(busy_prefill),
            "Redis killed and restarted": redis,
            "decode node SIGTERM (drain) mid-stream": drain,
            f"decode node SIGSTOP {stream_timeout_s + 2:.0f} s (hung)": hang}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--stream-timeout-s", type=float, default=5.0)
    args = parser.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rng = random.Random(32)
    engine = Engine(model=MODEL, num_kv_blocks=1024)
    rows = []
    with Cluster(MODEL, 2, 2, redis="local", router_args=["--stream-timeout-s", str(args.stream_timeout_s)]) as cluster:
        injections = faults(cluster, args.stream_timeout_s)
        for name, inject in [*injections.items(), ("clients leave mid-stream", None)]:
            prompts = [[rng.randrange(3, 40000) for _ in range(rng.randrange(100, 400))] for _ in range(args.streams)]
            expected = [c.token_ids for c in engine.generate(prompts, params)]
            leave = args.max_tokens // 3 if inject is None else None
            with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
                futures = [pool.submit(run_stream, cluster.router_address, p, params, leave) for p in prompts]
                undo = inject() if inject is not None else None
                results = [f.result() for f in futures]
            if undo is not None:
                undo()
            lost = dup = errors = 0
            for (tokens, _, error), want in zip(results, expected):
                errors += error is not None
                if error is not None:
                    print(f"{name}: a stream ended with {error}", file=sys.stderr)
                common = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), min(len(tokens), len(want)))
                lost += 0 if inject is None else len(want) - common  # a leaver wants only what it took
                dup += len(tokens) - common
            free = wait_until(lambda: all(all_free(stats(p)) for p in cluster.prefill + cluster.decode
                                          if p.popen.poll() is None), 60)
            rows.append((name, len(results), lost, dup, max(r[1] for r in results), errors, bool(free)))
            print(f"{name}: done", file=sys.stderr)
    print(f"{args.streams} streams per fault, {args.max_tokens} tokens each, {MODEL}, 2 prefill + 2 decode nodes, "
          f"local Redis, --stream-timeout-s {args.stream_timeout_s:g}; tokens against the in-process engine")
    print("| fault | streams | tokens lost | tokens duplicated | longest gap s | errors | all blocks free after |")
    print("|---|---|---|---|---|---|---|")
    for name, n, lost, dup, gap, errors, free in rows:
        print(f"| {name} | {n} | {lost} | {dup} | {gap:.2f} | {errors} | {'yes' if free else 'NO'} |")


if __name__ == "__main__":
    main()
