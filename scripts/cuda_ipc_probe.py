"""What the ipc connector relies on, checked on a GPU host (engine/private_apis.py
`share_cuda_tensor` / `open_cuda_tensor`, as kv_transfer/shared_pool.py uses them): a child
process exports a 1 GiB pool (as a decode node does), this process opens it and writes into it
(as a prefill node does), the child reads the writes; the write throughput; and what happens
to the writer when the exporter dies under it (a decode node killed mid-transfer).

    python3 scripts/cuda_ipc_probe.py
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.private_apis import open_cuda_tensor, share_cuda_tensor  # noqa: E402

ROWS, ROW = 8192, 65536  # bf16: 1 GiB


def exporter() -> None:
    pool = torch.zeros(ROWS, ROW, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    print(json.dumps(share_cuda_tensor(pool)), flush=True)
    sys.stdin.readline()  # the importer wrote
    torch.cuda.synchronize()
    print(float(pool[:ROWS // 2].float().sum()), flush=True)
    sys.stdin.readline()
    os._exit(0)  # dies as a killed decode node does: nothing freed in order


def main() -> None:
    if sys.argv[1:] == ["export"]:
        return exporter()
    child = subprocess.Popen([sys.executable, __file__, "export"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    fields = json.loads(child.stdout.readline())
    start = time.perf_counter()
    pool = open_cuda_tensor(fields, torch.bfloat16, torch.device("cuda:0"))
    print(f"opened the other process's pool in {1e3 * (time.perf_counter() - start):.1f} ms: "
          f"{None if pool is None else tuple(pool.shape)}")
    if pool is None:
        child.kill()
        return
    src = torch.ones(ROWS // 2, ROW, dtype=torch.bfloat16, device="cuda")
    rows = torch.arange(0, ROWS, 2, device="cuda")
    pool.index_copy_(0, rows, src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        pool.index_copy_(0, rows, src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    print(f"index_copy_ of 0.5 GiB into it: {1e3 * seconds:.2f} ms, {src.nbytes / seconds / 1e9:.0f} GB/s")
    pool[:ROWS // 2] = 1
    torch.cuda.synchronize()
    child.stdin.write("wrote\n")
    child.stdin.flush()
    print(f"the exporter reads {child.stdout.readline().strip()} (expected {float(ROWS // 2 * ROW)})")
    child.stdin.write("die\n")
    child.stdin.flush()
    child.wait()
    time.sleep(1)
    try:
        pool[:8] = 2
        torch.cuda.synchronize()
        print(f"after the exporter died a write still works (reads {float(pool[:8].float().sum())})")
    except RuntimeError as e:
        print(f"after the exporter died the write failed: {str(e)[:200]}")
    try:
        print(f"this process's CUDA context afterwards: {torch.ones(4, device='cuda').sum().item()} (fine)")
    except RuntimeError as e:
        print(f"this process's CUDA context is broken: {str(e)[:200]}")


if __name__ == "__main__":
    main()
