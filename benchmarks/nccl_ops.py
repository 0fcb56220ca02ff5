"""What one ProcessGroupNCCL send costs between two GPUs of one host (nvidia-h200-x2): the
host time to post it and the throughput of 512 MiB moved in ops of several sizes, one tensor
per op or several coalesced in one, as kv_transfer/pair.py posts them. The nccl connector's
throughput depends on how many ops it posts per byte; this says what each costs.

Usage: python benchmarks/nccl_ops.py            (starts its receiver process itself)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.kv_transfer.pair import PairOffer, ProcessGroupPair  # noqa: E402

TOTAL = 512 << 20
# name: (bytes per tensor, tensors per op)
PATTERNS = {"128 MiB x 1": (128 << 20, 1), "16 MiB x 1": (16 << 20, 1), "8 MiB x 1": (8 << 20, 1),
            "8 MiB x 2": (8 << 20, 2), "8 MiB x 16": (8 << 20, 16), "2 MiB x 1": (2 << 20, 1),
            "2 MiB x 2": (2 << 20, 2), "2 MiB x 64": (2 << 20, 64)}
REPS = 5


def ops(buffers, per_op):
    return [buffers[i:i + per_op] for i in range(0, len(buffers), per_op)]


def receiver(offer: dict) -> None:
    pair = ProcessGroupPair.create(PairOffer(**offer), 1, torch.device("cuda:1"), 60)
    pair.use_stream()
    for line in sys.stdin:
        size, per_op = json.loads(line)
        buffers = [torch.empty(size, dtype=torch.uint8, device="cuda:1") for _ in range(TOTAL // size)]
        torch.cuda.synchronize()
        print("ready", flush=True)
        for group in ops(buffers, per_op):
            pair.recv_many(group)
        pair.stream.synchronize()
        print(time.monotonic(), flush=True)


def main() -> None:
    device = torch.device("cuda:0")
    offer, store = ProcessGroupPair.offer("127.0.0.1", device)
    peer = subprocess.Popen([sys.executable, __file__, "--receiver", json.dumps(offer.__dict__)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pair = ProcessGroupPair.create(offer, 0, device, 60, store=store)
    pair.use_stream()
    rows = []
    for name, (size, per_op) in PATTERNS.items():
        buffers = [torch.ones(size, dtype=torch.uint8, device=device) for _ in range(TOTAL // size)]
        post_us, gbps = [], []
        for _ in range(REPS + 1):
            peer.stdin.write(json.dumps([size, per_op]) + "\n")
            peer.stdin.flush()
            assert peer.stdout.readline().strip() == "ready"
            torch.cuda.synchronize()
            start = time.monotonic()
            groups = ops(buffers, per_op)
            for group in groups:
                pair.send_many(group)
            posted = time.monotonic()
            done = float(peer.stdout.readline())
            post_us.append(1e6 * (posted - start) / len(groups))
            gbps.append(TOTAL / (done - start) / 2**30)
        post_us, gbps = sorted(post_us[1:])[REPS // 2], sorted(gbps[1:])[REPS // 2]
        rows.append((name, len(groups), post_us, gbps))
        print(f"{name}: {gbps:.0f} GiB/s", file=sys.stderr, flush=True)
    peer.stdin.close()
    peer.wait(30)
    print("\nProcessGroupNCCL sends, cuda:0 -> cuda:1, 512 MiB per run (median of 5)")
    print(f"{'tensors per op':16} {'ops':>5} {'host us / op':>13} {'GiB/s':>7}")
    for name, num_ops, us, g in rows:
        print(f"{name:16} {num_ops:5d} {us:13.1f} {g:7.0f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--receiver"]:
        receiver(json.loads(sys.argv[2]))
    else:
        main()
