"""The serving benchmark: what a user of this system would measure, with its baseline in the
same run.

An OpenAI streaming client (the official `openai` package) sends fixed-seed workloads to the
HTTP gateway of a local cluster (router, prefill and decode nodes as real processes), with
Poisson (or gamma) arrivals at each rate of a sweep, then a burst of requests all at once.
The same arrivals then go to one in-process Engine on the same device, with the KV block count
of one decode node, so every figure has its baseline. Per rate: TTFT, TPOT (per request:
(end - first token) / (tokens - 1)), ITL (gaps between streamed chunks) and end-to-end time
at p50/p90/p99; output tokens/s; goodput (requests/s that met the SLO); errors by HTTP status;
requests prefilled more than once (the router's retries); KV bytes the decode nodes received
per request. Prompts are token ids, so `dummy:` models work. Workloads: random lengths, a
shared prefix, or multi-turn chats (each turn the last one's prompt, an answer's worth of
tokens and a new message, sent once the last turn has ended). `--num-prefill 0` serves
aggregated; `--router-args` picks the disaggregation mode. Writes JSON, and PNG plots of
latency and goodput against offered rate.

    pdserve bench --model smollm2-135m                       # CPU (or python benchmarks/serving.py)
    pdserve bench --model dummy:llama3-8b --device cuda:0 \\
        --rates 1,4,8,16 --burst 200 --input-len 256:2048 --output-len 128    # one GPU

Every loop is bounded: `--num-requests` per rate, `--max-seconds` per rate (what is not done
by then is cancelled and counted as an error), and the burst's size.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from pathlib import Path

from pdserve.cli import cpu_share
from pdserve.cluster import Cluster

from . import serving_profile
from .serving_load import Workload, arrival_times, make_workload, run_engine, stream_requests, summarize


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (the cluster's nodes share it)")
    ap.add_argument("--num-prefill", type=int, default=1)
    ap.add_argument("--num-decode", type=int, default=1)
    ap.add_argument("--kv-connector", default="ipc", choices=("tcp", "nccl", "ipc"),
                    help="the decode nodes' connector (default ipc, as `pdserve up`: the cluster is on this host)")
    ap.add_argument("--rates", default="1,2,4", help="offered request rates, requests/s, comma-separated")
    ap.add_argument("--burst", type=int, default=16, help="then this many requests at once (0: none)")
    ap.add_argument("--num-requests", type=int, default=24, help="requests per rate")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="per rate: cancel what is left after this")
    ap.add_argument("--input-len", default="64:256", help="prompt tokens, lo:hi (uniform)")
    ap.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos)")
    ap.add_argument("--workload", default="random", choices=("random", "shared-prefix", "multi-turn", "mix"))
    ap.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per chat")
    ap.add_argument("--turn-len", type=int, default=64, help="multi-turn: tokens of each new message")
    ap.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens every prompt starts with")
    ap.add_argument("--arrivals", default="poisson", choices=("poisson", "gamma"))
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals' shape (1: Poisson)")
    ap.add_argument("--slo-ttft", type=float, default=1.0, help="seconds; goodput counts requests within both SLOs")
    ap.add_argument("--slo-tpot", type=float, default=0.05, help="seconds per output token")
    ap.add_argument("--num-kv-blocks", type=int, default=None,
                    help="each node's KV blocks (default: what the node sizes itself); the engine gets a decode node's")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--node-args", default="", help="more flags for every node, space-separated")
    ap.add_argument("--router-args", default="", help="flags for the router, e.g. '--disaggregation never'")
    ap.add_argument("--redis", action="store_true", help="a local redis-server for the prefix index "
                    "(the router then knows what each node's cache holds)")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process baseline")
    ap.add_argument("--profile-phase", default=None, help="sample the decode and prefill nodes with py-spy during this "
                    "phase (e.g. 16/s) and print where its host time goes")
    ap.add_argument("--profile-seconds", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/serving.json")
    ap.add_argument("--plots", default="benchmarks/results", help="folder for the PNG plots ('' : none)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("openai") is None:  # its client; matplotlib only for --plots
        print("pdserve bench: error: it needs the official openai client: pip install 'pdserve[bench]'",
              file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    phases = [(f"{r:g}/s", r) for r in rates] + ([(f"burst {args.burst}", None)] if args.burst else [])
    print(f"model {args.model} on {args.device}; phases: {', '.join(name for name, _ in phases)}", file=sys.stderr)
    cluster_rows, info = run_cluster(args, phases)
    engine_rows = {} if args.no_engine else run_engine_phases(args, phases, info)
    result = {"config": vars(args), "info": info, "phases": [
        {"phase": name, "rate": rate, "cluster": cluster_rows[name], "engine": engine_rows.get(name)}
        for name, rate in phases]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    if args.plots:
        from .serving_plots import plot
        for path in plot(result, Path(args.plots)):
            print(f"plot: {path}", file=sys.stderr)
    print(f"json: {out}", file=sys.stderr)
    return 0


def start_profiles(args, cluster, name: str) -> dict:
    """py-spy on the first decode node and the first prefill node (if any) while phase `name`
    runs, if asked for it: {role: its py-spy process}."""
    if args.profile_phase != name:
        return {}
    nodes = {"decode": cluster.decode[0], **({"prefill": cluster.prefill[0]} if cluster.prefill else {})}
    stem = name.replace("/", "_per_s").replace(" ", "_")
    return {role: serving_profile.start(node.popen.pid, args.profile_seconds,
                                        Path(args.out).with_name(f"{role}_profile_{stem}.txt"))
            for role, node in nodes.items()}


def engine_flags(args) -> list[str]:
    flags = ["--device", args.device]
    if args.num_kv_blocks:
        flags += ["--num-kv-blocks", str(args.num_kv_blocks)]
    elif args.device.startswith("cuda"):  # the nodes share the card: each sizes its KV cache from its part
        flags += ["--gpu-memory-utilization", f"{0.9 / (args.num_prefill + args.num_decode):.4f}"]
    if args.device == "cpu":  # and the cores, as `pdserve up` shares them (the engine takes them all)
        flags += ["--num-threads", str(cpu_share(args.num_prefill + args.num_decode))]
    if args.max_num_batched_tokens:
        flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    return flags + args.node_args.split()


def run_cluster(args, phases) -> tuple[dict, dict]:
    """Every phase through the cluster's gateway; the cluster's facts (blocks, vocabulary)."""
    rows = {}
    with Cluster(args.model, args.num_prefill, args.num_decode, node_args=engine_flags(args),
                 decode_args=["--kv-connector", args.kv_connector], router_args=args.router_args.split(),
                 redis="local" if args.redis else None, gateway_port=0,
                 log_level="WARNING").start(timeout=900, progress=lambda m: print(f"cluster: {m}", file=sys.stderr)) as cluster:
        info = cluster_info(cluster)
        warm_up = phase_workload(args, info["vocab_size"], "warm-up")  # compiles, allocates: not measured
        asyncio.run(stream_requests(cluster.gateway_url, info["model"], warm_up,
                                    arrival_times(args, None, len(warm_up.prompts)), args.max_seconds))
        for name, rate in phases:
            workload = phase_workload(args, info["vocab_size"], name)
            retries, kv_bytes, kv_tail = router_retries(cluster), kv_bytes_received(cluster), kv_tails(cluster)
            profiles = start_profiles(args, cluster, name)
            results, wall = asyncio.run(stream_requests(cluster.gateway_url, info["model"], workload,
                                                        arrival_times(args, rate, len(workload.prompts)),
                                                        args.max_seconds))
            rows[name] = summarize(results, wall, args.slo_ttft, args.slo_tpot)
            rows[name]["num_prefilled_twice"] = int(router_retries(cluster) - retries)
            rows[name]["kv_bytes_per_request"] = (kv_bytes_received(cluster) - kv_bytes) / len(workload.prompts)
            seconds, count = (after - before for after, before in zip(kv_tails(cluster), kv_tail))
            rows[name]["kv_tail_s_mean"] = seconds / count if count else 0.0
            print(f"cluster {name}: {brief(rows[name])}", file=sys.stderr)
            for role, profile in profiles.items():
                profile.wait()
                print(f"{role} node under {name}:\n{serving_profile.summarize(Path(profile.args[-1]))}")
    return rows, info


def run_engine_phases(args, phases, info) -> dict:
    from pdserve.engine.engine import Engine

    overrides = {"device": args.device, "num_kv_blocks": info["decode_kv_blocks"]}
    if args.max_num_batched_tokens:
        overrides["max_num_batched_tokens"] = args.max_num_batched_tokens
    engine = Engine(model=args.model, **overrides)
    warm_up = phase_workload(args, info["vocab_size"], "warm-up")
    run_engine(engine, warm_up, arrival_times(args, None, len(warm_up.prompts)), args.max_seconds)
    rows = {}
    for name, rate in phases:
        workload = phase_workload(args, info["vocab_size"], name)
        results, wall = run_engine(engine, workload, arrival_times(args, rate, len(workload.prompts)), args.max_seconds)
        rows[name] = summarize(results, wall, args.slo_ttft, args.slo_tpot)
        print(f"engine  {name}: {brief(rows[name])}", file=sys.stderr)
    return rows


def phase_workload(args, vocab_size: int, name: str) -> Workload:
    lo, hi = (int(x) for x in args.input_len.split(":"))
    count = {"warm-up": 4}.get(name, args.burst if name.startswith("burst") else args.num_requests)
    return make_workload(args.workload, vocab_size, count, (lo, hi), args.output_len, args.prefix_len,
                         seed=args.seed + sum(map(ord, name)), num_turns=args.num_turns, turn_len=args.turn_len)


def cluster_info(cluster) -> dict:
    from pdserve.protos import pdserve_pb2 as pb
    from pdserve.protos import pdserve_pb2_grpc as pb_grpc
    import grpc

    with grpc.insecure_channel(cluster.router_address) as channel:
        router = pb_grpc.RouterServiceStub(channel).GetInfo(pb.InfoRequest(), timeout=30)
    with grpc.insecure_channel(cluster.decode[0].address) as channel:
        decode = pb_grpc.DecodeServiceStub(channel).GetStats(pb.StatsRequest(), timeout=30,
                                                             metadata=cluster.decode[0].metadata)
    return {"model": cluster.gateway.info["model"], "vocab_size": router.vocab_size,
            "max_model_len": router.max_model_len, "decode_kv_blocks": decode.num_kv_blocks}


def router_retries(cluster) -> float:
    return metric_sum(cluster.router, "pdserve_retries_total")


def kv_bytes_received(cluster) -> float:
    """KV bytes the decode nodes' receivers took so far."""
    return sum(metric_sum(d, "pdserve_kv_transfer_bytes_total", direction="received") for d in cluster.decode)


def kv_tails(cluster) -> tuple[float, float]:
    """The prefill nodes' transfer tails so far (from a prefill's answer to its DONE sent: the
    KV still moving after the first token), as (seconds in all, transfers): one scrape a node."""
    seconds = count = 0.0
    for p in cluster.prefill:
        samples = metric_samples(p)
        seconds += metric_sum(p, "pdserve_kv_transfer_seconds_sum", samples=samples)
        count += metric_sum(p, "pdserve_kv_transfer_seconds_count", samples=samples)
    return seconds, count


def metric_samples(process) -> list:
    """Every sample on a process's /metrics (docs/metrics.md)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{process.info['metrics_port']}/metrics", timeout=10).read()
    return [sample for family in text_string_to_metric_families(text.decode()) for sample in family.samples]


def metric_sum(process, name: str, samples: list | None = None, **labels) -> float:
    """The sum of a process's samples named `name` that carry `labels` (`samples`: those of a
    scrape already made)."""
    return sum(sample.value for sample in (metric_samples(process) if samples is None else samples)
               if sample.name == name and labels.items() <= sample.labels.items())


def brief(row: dict) -> str:
    return (f"{row['num_ok']}/{row['num_requests']} ok, TTFT p50 {row['ttft_ms']['p50']:.0f} ms, "
            f"TPOT p50 {row['tpot_ms']['p50']:.1f} ms, {row['output_tok_s']:.0f} tok/s, "
            f"goodput {row['goodput_req_s']:.2f} req/s"
            + (f", KV tail {1e3 * row['kv_tail_s_mean']:.0f} ms" if row.get("kv_tail_s_mean") else ""))


def print_table(result: dict) -> None:
    header = (f"{'phase':>10} {'side':>7} {'ok':>7} {'TTFT p50/p90 ms':>17} {'TPOT p50/p90 ms':>16} "
              f"{'ITL p50/p99 ms':>15} {'E2E p50 s':>9} {'out tok/s':>9} {'goodput':>8} {'errors':>8} {'2x pre':>6} "
              f"{'KV KiB/req':>10}")
    print(header)
    for phase in result["phases"]:
        for side in ("cluster", "engine"):
            row = phase[side]
            if row is None:
                continue
            errors = ",".join(f"{k}:{v}" for k, v in row["errors"].items()) or "0"
            print(f"{phase['phase']:>10} {side:>7} {row['num_ok']:>3}/{row['num_requests']:<3} "
                  f"{row['ttft_ms']['p50']:>8.0f}/{row['ttft_ms']['p90']:<8.0f} "
                  f"{row['tpot_ms']['p50']:>7.1f}/{row['tpot_ms']['p90']:<8.1f} "
                  f"{row['itl_ms']['p50']:>7.1f}/{row['itl_ms']['p99']:<7.1f} {row['e2e_s']['p50']:>9.2f} "
                  f"{row['output_tok_s']:>9.0f} {row['goodput_req_s']:>8.2f} {errors:>8} "
                  f"{row.get('num_prefilled_twice', 0):>6} "
                  f"{row['kv_bytes_per_request'] / 1024 if 'kv_bytes_per_request' in row else 0:>10.0f}")
        if phase["engine"]:
            c, e = phase["cluster"], phase["engine"]
            print(f"{'':>10} {'ratio':>7} {'':>7} {ratio(c['ttft_ms']['p50'], e['ttft_ms']['p50']):>17} "
                  f"{ratio(c['tpot_ms']['p50'], e['tpot_ms']['p50']):>16} {'':>15} {'':>9} "
                  f"{ratio(c['output_tok_s'], e['output_tok_s']):>9}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


if __name__ == "__main__":
    sys.exit(main())
