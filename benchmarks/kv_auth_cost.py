"""What proving the ticket's secret costs the tcp connector (issue 32), measured in one run:
a TcpKVSender pushing transfers over loopback into a KVSocketReceiver's cache (on the GPU when
there is one: pinned staging and the copy stream, as on a decode node), with the tags on (as
shipped) and off (`proof.tag` and `proof.proves` replaced by no-ops), the two alternating rep
by rep. Also the cost of one tag, and of one tag per layer against the time a layer's bytes
take on the wire. With --tls, a third mode: tags on and the connection under TLS
(service/tls.py; certificates from a throwaway CA made by `trustme`, a test dependency).

Usage: python benchmarks/kv_auth_cost.py [--reps 5] [--tokens 2048] [--layers 32] [--concurrent 4] [--tls]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import timeit
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.kv_pool import allocate_kv_caches  # noqa: E402
from pdserve.kv_transfer import proof  # noqa: E402
from pdserve.kv_transfer.connector import KVTicket  # noqa: E402
from pdserve.kv_transfer.receiver import KVSocketReceiver  # noqa: E402
from pdserve.kv_transfer.sockets import ClientTls  # noqa: E402
from pdserve.kv_transfer.tcp_sender import TcpKVSender  # noqa: E402

BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 8, 128  # Llama-3-8B's KV


def run_once(receiver, sender, layers, num_blocks_each: int, concurrent: int, dtype: str) -> float:
    """Seconds from the first layer handed over to the last transfer settled."""
    done, lock, results = threading.Event(), threading.Lock(), []

    def on_done(result):
        with lock:
            results.append(result)
            if len(results) == concurrent:
                done.set()

    tickets = []
    for i in range(concurrent):
        ids = tuple(range(i * num_blocks_each, (i + 1) * num_blocks_each))
        ticket = KVTicket(uuid.uuid4().hex, receiver.endpoint, ids, BLOCK_SIZE, len(layers), KV_HEADS, HEAD_DIM,
                          dtype, time.time() + 60, "bench")
        receiver.expect(ticket, on_done)
        tickets.append(ticket)
    start = time.perf_counter()
    for layer, kv in enumerate(layers):
        sender.send_layers(layer, [(t, kv) for t in tickets])
    for ticket in tickets:
        sender.finish(ticket, 1)
    assert done.wait(120), "transfers did not settle"
    elapsed = time.perf_counter() - start
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    return elapsed


def tls_pair(caches) -> tuple[KVSocketReceiver, TcpKVSender]:
    """A receiver and a sender speaking TLS, with a throwaway CA's certificate for 127.0.0.1."""
    import ssl

    import trustme  # a test dependency: `make setup` installs it

    ca = trustme.CA()
    server, client = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), ssl.create_default_context()
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca.configure_trust(client)
    return KVSocketReceiver(caches, tls=server), TcpKVSender(tls=ClientTls(client))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--tls", action="store_true", help="also measure the connection under TLS")
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    num_blocks_each = args.tokens // BLOCK_SIZE
    caches = allocate_kv_caches(args.layers, (BLOCK_SIZE, KV_HEADS, HEAD_DIM), num_blocks_each * args.concurrent,
                                dtype, device)
    layers = [torch.randn(2, num_blocks_each, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=device).to(dtype)
              for _ in range(args.layers)]
    plain = (KVSocketReceiver(caches), TcpKVSender())
    name = str(dtype).removeprefix("torch.")
    real_tag, real_proves = proof.tag, proof.proves
    modes = {"tags on": (real_tag, real_proves, plain),
             "tags off": (lambda secret, data: proof.NO_TAG, lambda secret, data, given: True, plain)}
    if args.tls:
        modes["tags on + TLS"] = (real_tag, real_proves, tls_pair(caches))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _, _, (receiver, sender) in modes.values():  # warm-up: connection, staging
        run_once(receiver, sender, layers, num_blocks_each, args.concurrent, name)
    for _ in range(args.reps):
        for mode, (tag, proves, (receiver, sender)) in modes.items():
            proof.tag, proof.proves = tag, proves
            times[mode].append(run_once(receiver, sender, layers, num_blocks_each, args.concurrent, name))
    proof.tag, proof.proves = real_tag, real_proves
    for _, _, (receiver, sender) in modes.values():
        sender.close()
        receiver.close()
    num_bytes = args.concurrent * sum(kv.nbytes for kv in layers)
    print(f"device {device}, {args.concurrent} transfers of {args.tokens} tokens x {args.layers} layers "
          f"({num_bytes / 2**20:.0f} MiB a rep, {layers[0].nbytes / 2**20:.1f} MiB a layer), {args.reps} reps")
    print("| mode | median s | GB/s (median) | spread (min-max s) |")
    print("|---|---|---|---|")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"| {mode} | {med:.4f} | {num_bytes / med / 1e9:.2f} | {min(ts):.4f}-{max(ts):.4f} |")
    for mode in [m for m in modes if m != "tags off"]:
        ratio = statistics.median(times[mode]) / statistics.median(times["tags off"])
        per_rep = [a / b for a, b in zip(times[mode], times["tags off"])]
        print(f"{mode} / tags off, median time: {ratio:.3f} (rep by rep {min(per_rep):.3f}-{max(per_rep):.3f})")
    secret, header = proof.new_secret(), bytes(68)
    tag_s = min(timeit.repeat(lambda: real_tag(secret, header), number=10000, repeat=5)) / 10000
    check_s = min(timeit.repeat(lambda: real_proves(secret, header, proof.NO_TAG), number=10000, repeat=5)) / 10000
    layer_s = statistics.median(times["tags off"]) / (args.layers * args.concurrent)
    print(f"one tag {tag_s * 1e6:.2f} us, one check {check_s * 1e6:.2f} us; a layer on the wire {layer_s * 1e3:.3f} ms "
          f"-> tag + check per layer {100 * (tag_s + check_s) / layer_s:.4f}% of it")


if __name__ == "__main__":
    main()
