"""KV connectors between two GPUs of one host (run on nvidia-h200-x2), measured in one run:

  1. throughput: the `nccl` and `tcp` connectors moving Llama-3-8B KV from a sender on cuda:0
     to a receiver process on cuda:1 (into its cache blocks): one 4k-token request (512 MiB,
     its blocks one run, and scattered) and 16 concurrent 1k-token requests; against raw NCCL
     send/recv of the same tensors between the same processes (buffers allocated before the
     clock starts). Time: from the first send to the receiver's last callback or completed
     receive (CLOCK_MONOTONIC is system-wide). Raw NCCL runs three ways (one op per tensor,
     tensors coalesced in groups of the connector's group size, each such group as one
     message); the ratios are against the fastest. With --timeline, each nccl run prints when
     each group was posted on both sides and when its bytes were joined and landed on the
     devices, and how long the posting threads spent in each step.
  2. exposed transfer: a cluster (router, prefill on cuda:0, a decode node on cuda:1 per
     connector) serving 4k-token prompts of 2 output tokens, against the in-process engine on
     cuda:0. The prefill node answers with the first token before the KV has moved, so the
     transfer shows in the second token: exposed transfer = (second token - first token at the
     client) - the engine's decode step (a 2-token generate less a 1-token one). Also shown:
     TTFT against the engine's prefill alone, and the prefill node's `kv_transfer_seconds`
     (from its first token to the last KV byte sent).

Usage: python benchmarks/kv_connectors.py [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.kv_pool import LayerSlabs, allocate_kv_caches  # noqa: E402
from pdserve.engine.presets import PRESETS  # noqa: E402
from pdserve.kv_transfer.connector import KVTicket  # noqa: E402
from pdserve.kv_transfer.pair import PairOffer, ProcessGroupPair  # noqa: E402

from benchmarks.kv_timeline import DeviceClock, busy, print_timeline, timeline  # noqa: E402

MODEL = "dummy:llama3-8b"
CFG = PRESETS["llama3-8b"]
BLOCK_SIZE, NUM_BLOCKS, DTYPE = 16, 1400, torch.bfloat16
DEVICES = {"send": "cuda:0", "recv": "cuda:1"}  # --cpu: both "cpu" (gloo), a smoke test
SCALE = 1  # --cpu: requests 16x shorter


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def block_shape():
    return (BLOCK_SIZE, CFG.num_kv_heads, CFG.head_dim)


# ---- options, and the marks of --timeline (benchmarks/kv_timeline.py) ------------------------

TIMELINE = False  # --timeline
SKIP_TCP = False  # --skip-tcp
SENT: list = []  # the sender's timeline: (time, layers, seconds, device time) per group
SENT_NCCL: list = []  # the same per NCCL post
GROUP_SIZES: list = []  # layers per group of the nccl connector, in the current case
SENDER_STEPS: dict = {}  # seconds per step of the nccl sender's thread, this run


def checksum(tensors) -> int:
    """Exact and order-free: the sum of the tensors' 16-bit words."""
    return sum(int(t.contiguous().view(torch.int16).to(torch.int64).sum()) for t in tensors)


def blocks_checksum(caches, block_ids) -> int:
    ids = torch.tensor(block_ids, device=caches[0][0].device)
    return checksum(cache[ids] for pair in caches for cache in pair)


# ---- the receiver process (cuda:1) ------------------------------------------------------

def serve_receiver() -> None:
    """Lines of JSON on stdin -> lines of JSON on stdout."""
    from pdserve.kv_transfer import nccl_receiver
    from pdserve.kv_transfer.nccl_receiver import PairPayloads
    from pdserve.kv_transfer.receiver import KVSocketReceiver
    posted, nccl, steps = [], [], {}
    if TIMELINE:
        timeline(PairPayloads, "recv_group", posted)
        timeline(ProcessGroupPair, "recv_many", nccl, device_times=True)
        busy(PairPayloads, ["_scatter", "_span_rows"], steps)
        busy(nccl_receiver, ["_rows_of", "to_device", "_layer_span"], steps)
        busy(KVSocketReceiver, ["admit_entries"], steps)
    device = torch.device(DEVICES["recv"])
    caches = allocate_kv_caches(CFG.num_layers, block_shape(), NUM_BLOCKS, DTYPE, device)
    receiver = KVSocketReceiver(caches, pair_timeout=60)
    raw_pair = None
    emit({"endpoint": receiver.endpoint})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "expect":
            tickets = [KVTicket.from_json_dict(t) for t in cmd["tickets"]]
            results, all_done = [], threading.Event()

            def on_done(result, n=len(tickets)):
                results.append((time.monotonic(), result.ok, result.error))
                if len(results) == n:
                    all_done.set()
            for cache in (c for pair in caches for c in pair):  # nothing left from the last run
                cache.zero_()
            sync()
            for t in tickets:
                receiver.expect(t, on_done)
            posted.clear()
            nccl.clear()
            steps.clear()
            clock = DeviceClock(device) if TIMELINE and device.type == "cuda" else None
            emit({"expecting": len(tickets)})
            all_done.wait(120)
            device_times = clock.device_times if clock else lambda marks: marks
            emit({"done": max(r[0] for r in results), "ok": all(r[1] for r in results),
                  "errors": [r[2] for r in results if r[2]][:3],
                  "posted": [m[:3] for m in posted], "received": device_times(nccl),
                  "switch interval": sys.getswitchinterval(), "steps": steps,
                  "landed": [blocks_checksum(caches, t.block_ids) for t in tickets]})
        elif cmd["cmd"] == "raw":
            if raw_pair is None:  # NCCL connects on the first op: one small one, both sides
                raw_pair = ProcessGroupPair.create(PairOffer(**cmd["offer"]), 1, device, 60)
                raw_pair.use_stream()  # this (main) thread posts its ops
                raw_pair.recv_many([torch.empty(1, device=device)])
            buffers = [torch.empty(s, dtype=DTYPE, device=device) for s in cmd["shapes"]]
            emit({"ready": len(buffers)})  # posting may block until the sends start: no waiting before
            for group in raw_groups(buffers, cmd["grouped"]):
                raw_pair.recv_many(group)
            if raw_pair.stream is not None:
                raw_pair.stream.synchronize()
            emit({"done": time.monotonic()})
        else:
            return


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


# ---- the sender side (this process, cuda:0) ---------------------------------------------

class Peer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-receiver", *sys.argv[1:]],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint = self.read()["endpoint"]

    def send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the receiver process died")
        return json.loads(line)

    def close(self) -> None:
        self.send({"cmd": "quit"})
        self.proc.wait(30)


def make_case(num_requests: int, num_tokens: int, scattered: bool):
    """Block ids per request on the receiver, and each request's layers on cuda:0: as a prefill
    step hands them over (prefill_node/service.py), a layer of all the requests is one tensor,
    in slabs of consecutive layers (LayerSlabs), and each request's is a view of it."""
    num_blocks = num_tokens // BLOCK_SIZE // SCALE
    ids = list(range(num_requests * num_blocks))
    if scattered:
        random.Random(0).shuffle(ids)
    block_ids = [ids[i * num_blocks:(i + 1) * num_blocks] for i in range(num_requests)]
    slabs = LayerSlabs(CFG.num_layers, (num_requests, 2, num_blocks, *block_shape()), DTYPE,
                       torch.device(DEVICES["send"]))
    gathered = [slabs.layer(layer) for layer in range(CFG.num_layers)]
    for g in gathered:
        g.copy_(torch.randn(g.shape, device=g.device))
    layers = [[g[i] for g in gathered] for i in range(num_requests)]
    return block_ids, layers


def connector_seconds(peer: Peer, sender, connector: str, block_ids, layers) -> float:
    tickets = [KVTicket(uuid.uuid4().hex, peer.endpoint, tuple(ids), BLOCK_SIZE, CFG.num_layers,
                        CFG.num_kv_heads, CFG.head_dim, "bfloat16", time.time() + 60, "fp", connector)
               for ids in block_ids]
    peer.send({"cmd": "expect", "tickets": [t.as_json_dict() for t in tickets]})
    peer.read()
    SENT.clear()  # this run's posts only (the raw runs post on the same kind of pair)
    SENT_NCCL.clear()
    SENDER_STEPS.clear()
    sync()
    clock = DeviceClock(DEVICES["send"]) if TIMELINE and torch.cuda.is_available() else None
    start = time.monotonic()
    handed_over = []  # when each call returned: --timeline
    for layer in range(CFG.num_layers):  # as a prefill step hands them over: layer by layer
        sender.send_layers(layer, [(t, kv[layer]) for t, kv in zip(tickets, layers)])
        handed_over.append(time.monotonic())
    futures = [sender.finish(t, 1) for t in tickets]
    handed_over.append(time.monotonic())
    reply = peer.read()
    for f in futures:
        f.result(60)
    if not reply["ok"]:
        raise RuntimeError(f"{connector}: transfer failed: {reply['errors']}")
    if reply["landed"] != [checksum(kv[i] for kv in ls for i in (0, 1)) for ls in layers]:
        raise RuntimeError(f"{connector}: the blocks do not hold the bytes sent")
    if connector == "nccl" and TIMELINE:
        print_timeline(start, handed_over, reply, SENT, clock.device_times(SENT_NCCL) if clock else SENT_NCCL,
                       SENDER_STEPS)
    GROUP_SIZES.extend(n for _, n, *_ in SENT)
    return reply["done"] - start


def raw_groups(tensors, grouped: bool) -> list[list]:
    """One op per tensor, or groups of up to RAW_GROUP_BYTES (the same on both sides)."""
    if not grouped:
        return [[t] for t in tensors]
    groups, num_bytes = [[]], 0
    for t in tensors:
        if groups[-1] and num_bytes + t.nbytes > RAW_GROUP_BYTES:
            groups.append([])
            num_bytes = 0
        groups[-1].append(t)
        num_bytes += t.nbytes
    return groups


RAW_GROUP_BYTES = 128 << 20  # the connector's default group size, and the fastest raw message size measured
RAW_WAYS = ("per-tensor", "coalesced", "one message per group")


def raw_seconds(peer: Peer, pair_state: dict, layers, how: str) -> float:
    """Raw NCCL moving the same bytes between the same processes, no frames, no tickets, no
    scatter, in one of three ways: K and V of each layer of each request one op each; those
    tensors coalesced in groups of RAW_GROUP_BYTES; or each such group's bytes
    concatenated beforehand (off the clock) and sent as one message."""
    tensors = [kv[layer][i] for layer in range(CFG.num_layers) for kv in layers for i in (0, 1)]
    grouped = how == "coalesced"
    if how == "one message per group":
        tensors = [torch.cat([t.view(-1) for t in group]) for group in raw_groups(tensors, True)]
    cmd = {"cmd": "raw", "offer": None, "grouped": grouped, "shapes": [list(t.shape) for t in tensors]}
    if "pair" not in pair_state:
        offer, store = ProcessGroupPair.offer("127.0.0.1", torch.device(DEVICES["send"]))
        peer.send({**cmd, "offer": dataclasses.asdict(offer)})
        pair_state["pair"] = pair = ProcessGroupPair.create(offer, 0, torch.device(DEVICES["send"]), 60,
                                                            store=store)
        pair.use_stream()  # this (main) thread posts its ops
        pair.send_many([torch.zeros(1, device=DEVICES["send"])])
    else:
        pair = pair_state["pair"]
        peer.send(cmd)
    peer.read()  # the receiver's buffers are there; it posts its receives now
    sync()
    start = time.monotonic()
    for group in raw_groups(tensors, grouped):
        pair.send_many(group)
    return peer.read()["done"] - start


def throughput(reps: int) -> list[dict]:
    from pdserve.kv_transfer import nccl
    from pdserve.kv_transfer.nccl import NcclKVSender, PairChannel
    from pdserve.kv_transfer.tcp_sender import TcpKVSender
    peer, pair_state, rows = Peer(), {}, []
    timeline(PairChannel, "send_layers", SENT)  # its group sizes: whatever was queued when it got to them
    if TIMELINE:
        timeline(ProcessGroupPair, "send_many", SENT_NCCL, device_times=True)
        busy(PairChannel, ["_write", "_drop_if_closed"], SENDER_STEPS)
        busy(NcclKVSender, ["send_layers"], SENDER_STEPS)
        busy(nccl, ["_joined"], SENDER_STEPS)
    senders = {"nccl": NcclKVSender(DEVICES["send"], 30, 60), "tcp": TcpKVSender(30)}
    if SKIP_TCP:
        senders.pop("tcp").close()
    try:
        for name, (n, tokens, scattered) in {"1 x 4k, one run": (1, 4096, False),
                                             "1 x 4k, scattered": (1, 4096, True),
                                             "16 x 1k": (16, 1024, False)}.items():
            print(f"throughput: {name}", file=sys.stderr, flush=True)
            block_ids, layers = make_case(n, tokens, scattered)
            num_bytes = sum(kv.nbytes for ls in layers for kv in ls)
            times = {f"raw {how}": [raw_seconds(peer, pair_state, layers, how) for _ in range(reps + 1)][1:]
                     for how in RAW_WAYS}
            GROUP_SIZES.clear()
            for c, sender in senders.items():
                times[c] = [connector_seconds(peer, sender, c, block_ids, layers) for _ in range(reps + 1)][1:]
            gbps = {k: num_bytes / statistics.median(v) / 2**30 for k, v in times.items()}
            best_raw = max(gbps[f"raw {how}"] for how in RAW_WAYS)  # the ratios are against the fastest
            each_rep = {c: [num_bytes / t / 2**30 / best_raw for t in times[c]] for c in senders}
            rows.append({"case": name, "MiB": num_bytes / 2**20, **{f"{k} GiB/s": g for k, g in gbps.items()},
                         **{f"{c} / raw": gbps[c] / best_raw for c in senders},
                         "nccl / raw reps": f"{min(each_rep['nccl']):.2f}-{max(each_rep['nccl']):.2f}",
                         "nccl layers / group": statistics.mean(GROUP_SIZES),
                         **{f"{c} / raw each rep": ratios for c, ratios in each_rep.items()}})  # --json only
            del layers
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        for s in senders.values():
            s.close()
        peer.close()
    return rows


# ---- exposed transfer time in the pipeline -----------------------------------------------

def exposed_transfer(reps: int) -> list[dict]:
    from pdserve.engine.engine import Engine
    from pdserve.engine.sampling_params import SamplingParams
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 128000) for _ in range(4096)] for _ in range(4 * (reps + 1))]
    args = ["--num-kv-blocks", "1200", "--max-model-len", "8192", "--max-num-batched-tokens", "4096"]
    one, two = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 2))
    engine = Engine(model=MODEL, device="cuda:0", num_kv_blocks=600, max_model_len=8192,
                    max_num_batched_tokens=4096)
    alone, alone_two = [], []
    for p in prompts[:reps + 1]:
        for params, times in ((one, alone), (two, alone_two)):
            start = time.perf_counter()
            engine.generate([p], params)
            times.append(time.perf_counter() - start)
    del engine
    torch.cuda.empty_cache()
    print("pipeline: prefill alone done; starting the clusters", file=sys.stderr, flush=True)
    rows = {c: pipeline_samples(c, prompts[(i + 1) * (reps + 1):(i + 2) * (reps + 1)], args, two)
            for i, c in enumerate(("nccl", "tcp"))}
    prefill_alone = statistics.median(alone[1:])
    decode_step = statistics.median(alone_two[1:]) - prefill_alone
    out = []
    for c, samples in rows.items():
        samples = samples[1:]  # the first on each pair makes it
        ttft, second, prefill, sent = (statistics.median(x) for x in zip(*samples))
        exposed = second - ttft - decode_step
        out.append({"connector": c, "prefill alone ms": 1e3 * prefill_alone, "TTFT ms": 1e3 * ttft,
                    "TTFT / prefill alone": ttft / prefill_alone, "decode step ms": 1e3 * decode_step,
                    "2nd token - 1st ms": 1e3 * (second - ttft), "exposed transfer ms": 1e3 * exposed,
                    "exposed / prefill alone": exposed / prefill_alone,
                    "prefill-node transfer ms": 1e3 * sent, "prefill-node prefill ms": 1e3 * prefill})
    return out


def pipeline_samples(connector: str, prompts, args, params) -> list[tuple[float, float, float, float]]:
    """(first token s, second token s, prefill s, transfer s as the prefill node saw it) per
    prompt through a cluster whose decode node asks for `connector`; the prefill node's
    transfer log lines go to stderr."""
    from pdserve.client import generate_request, stream
    from pdserve.cluster import Cluster
    samples = []
    with Cluster(MODEL, 1, 1, node_args=args, prefill_args=["--device", "cuda:0", "--log-level", "DEBUG"],
                 decode_args=["--device", "cuda:1", "--kv-connector", connector]).start(timeout=600) as cluster:
        for prompt in prompts:
            start, arrivals = time.perf_counter(), []
            for response in stream(cluster.router_address, generate_request(prompt, params), timeout=120):
                arrivals += [time.perf_counter() - start] * len(response.token_ids)
                timings = response.timings
            samples.append((arrivals[0], arrivals[1], timings.prefill_seconds, timings.kv_transfer_seconds))
        lines = [x for x in cluster.prefill[0].log_tail(400).splitlines() if "layers queued" in x]
        print("\n".join(lines[-len(prompts):]), file=sys.stderr)
    return samples


def table(rows: list[dict]) -> str:
    keys = [k for k, v in rows[0].items() if not isinstance(v, list)]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(k), *(len(fmt(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(fmt(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-receiver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--timeline", action="store_true",
                        help="when each nccl group was posted and landed, and where the threads' time went")
    parser.add_argument("--cpu", action="store_true", help="a smoke test on CPU (gloo), no pipeline")
    parser.add_argument("--skip-tcp", action="store_true", help="throughput of nccl and raw only")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="ms: sys.setswitchinterval in both processes (CPython's default is 5)")
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(1e-3 * args.switch_interval)
    global TIMELINE, SKIP_TCP
    TIMELINE, SKIP_TCP = args.timeline, args.skip_tcp
    if args.cpu:
        global SCALE
        DEVICES.update(send="cpu", recv="cpu")
        SCALE, args.skip_pipeline = 16, True
    if args.serve_receiver:
        return serve_receiver()
    assert args.cpu or torch.cuda.device_count() >= 2, "needs two GPUs"
    rows = [] if args.skip_throughput else throughput(args.reps)
    pipeline = [] if args.skip_pipeline else exposed_transfer(args.reps)
    if args.json:
        Path(args.json).write_text(json.dumps({"throughput": rows, "pipeline": pipeline}, indent=1))
    if rows:
        print(f"\nKV connector throughput, {DEVICES['send']} -> {DEVICES['recv']} (median of {args.reps} "
              "after a warm-up)")
        print(table(rows))
    if pipeline:
        print("\n4k-token prompt: exposed KV transfer (in the second token) against the engine on one GPU")
        print(table(pipeline))


if __name__ == "__main__":
    main()
