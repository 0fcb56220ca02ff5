"""Issue 32's fault table, measured in one run: each fault injected into a live cluster (two
prefill and two decode nodes serving SmolLM2-135M with a local Redis, real processes) while
streams run, then, per fault: the streams affected, tokens lost or duplicated (each stream's
tokens against the in-process engine's greedy answer to the same prompt), the longest gap a
client saw between two messages of one stream, and errors.

Faults, after a baseline round with none (on a small CPU the longest gap of an undisturbed
stream is already seconds: prefills of other prompts share the cores): kill -9 of the decode
node that runs streams; kill -9 of a prefill node while prompts are being prefilled; kill -9
of every decode node at once, restarted at once (the streams have nowhere to resume until one
is back: the router's `--resume-wait-s`); Redis killed and restarted; SIGTERM (drain) of a
decode node; SIGSTOP of a decode node (hung; SIGCONT after the router's stream timeout), under
the same load and with one stream alone (the acceptance's "bound plus one step"); clients that
leave mid-stream (the check there: every block of every node free afterwards). A killed node
is restarted before the next fault.

Usage: python benchmarks/faults.py [--streams 8] [--max-tokens 48] [--kv-connector tcp|nccl|ipc]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

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


STREAMING = threading.Event()  # set once some stream has a few tokens: faults "mid-stream" wait for it


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
            if len(tokens) >= 4:
                STREAMING.set()
            if leave_after is not None and len(tokens) >= leave_after:
                call.close()
                break
        return tokens, gap, None
    except grpc.RpcError as e:
        return tokens, gap, f"{e.code().name}: {e.details()}"


def busy_decode(cluster):
    STREAMING.wait(120)
    return next((d for d in cluster.decode if d.popen.poll() is None and stats(d).num_running), None)


def busy_prefill(cluster):
    return next((p for p in cluster.prefill if p.popen.poll() is None and working(stats(p))), None)


def working(s: pb.NodeStats) -> bool:
    return bool(s.num_running or s.num_waiting)


def all_free(s: pb.NodeStats) -> bool:
    return s.num_free_blocks == s.num_kv_blocks


class Fault(NamedTuple):
    name: str
    inject: Callable[[], Callable[[], object]] | None  # once streams run; returns the undo (None: clients leave)
    num_streams: int


def faults(cluster: Cluster, stream_timeout_s: float, num_streams: int) -> list[Fault]:
    def kill(find):
        def act():
            victim = wait_until(lambda: find(cluster))
            victim.popen.send_signal(signal.SIGKILL)
            return lambda: cluster.restart(victim.name)
        return act

    def restart_all_decode():
        wait_until(lambda: busy_decode(cluster))
        victims = list(cluster.decode)
        for victim in victims:
            victim.popen.send_signal(signal.SIGKILL)
        for victim in victims:  # as a supervisor would; the streams wait meanwhile
            cluster.restart(victim.name)
        return lambda: None

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

    hung = f"decode node SIGSTOP {stream_timeout_s + 2:.0f} s (hung)"
    return [Fault("none (the baseline: the same load undisturbed)", lambda: (lambda: None), num_streams),
            Fault("decode node kill -9 mid-stream", kill(busy_decode), num_streams),
            Fault("prefill node kill -9 while prefilling", kill(busy_prefill), num_streams),
            Fault("every decode node kill -9 mid-stream, restarted", restart_all_decode, num_streams),
            Fault("Redis killed and restarted", redis, num_streams),
            Fault("decode node SIGTERM (drain) mid-stream", drain, num_streams),
            Fault(hung, hang, num_streams),
            Fault(f"{hung}, one stream alone (the bound plus one step)", hang, 1),
            Fault("clients leave mid-stream", None, num_streams)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--stream-timeout-s", type=float, default=5.0)
    parser.add_argument("--only", default="", help="run only the faults whose name contains this")
    parser.add_argument("--rounds", type=int, default=1, help="inject each fault this many times")
    parser.add_argument("--log-dir", default=None, help="keep the nodes' logs here")
    parser.add_argument("--kv-connector", default="tcp", choices=("tcp", "nccl", "ipc"),
                        help="what the decode nodes ask prefill nodes to send with")
    args = parser.parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    rng = random.Random(32)
    engine = Engine(model=MODEL, num_kv_blocks=1024)
    rows = []
    with Cluster(MODEL, 2, 2, redis="local", log_dir=args.log_dir, decode_args=["--kv-connector", args.kv_connector],
                 router_args=["--stream-timeout-s", str(args.stream_timeout_s)]) as cluster:
        chosen = [f for f in faults(cluster, args.stream_timeout_s, args.streams) if args.only in f.name]
        for name, inject, num_streams in chosen * args.rounds:
            prompts = [[rng.randrange(3, 40000) for _ in range(rng.randrange(100, 400))] for _ in range(num_streams)]
            expected = [c.token_ids for c in engine.generate(prompts, params)]
            leave = args.max_tokens // 3 if inject is None else None
            STREAMING.clear()
            with concurrent.futures.ThreadPoolExecutor(num_streams) as pool:
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
    print(f"{args.streams} streams per fault unless said, {args.max_tokens} tokens each, {MODEL}, 2 prefill + 2 decode nodes, "
          f"local Redis, --stream-timeout-s {args.stream_timeout_s:g}; tokens against the in-process engine")
    print("| fault | streams | tokens lost | tokens duplicated | longest gap s | errors | all blocks free after |")
    print("|---|---|---|---|---|---|---|")
    for name, n, lost, dup, gap, errors, free in rows:
        print(f"| {name} | {n} | {lost} | {dup} | {gap:.2f} | {errors} | {'yes' if free else 'NO'} |")


if __name__ == "__main__":
    main()
