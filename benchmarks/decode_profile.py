"""Where a decode step's GPU time goes: kernel time per step by kernel, from torch.profiler
over eager decode steps (a graph replays the same kernels, without the launch gaps; its
attention has more KV splits, as it is captured for max_model_len). Usage, on a GPU:

    python3 benchmarks/decode_profile.py [--model dummy:llama3-8b] [--batch 1,8] [--context 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    engine = Engine(model=args.model, device="cuda", enforce_eager=True, max_num_seqs=max(batches),
                    num_kv_blocks=max(batches) * (args.context + 64) // 16 + 16)
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for batch in batches:
        ids = [engine.add_request([100 + i] * args.context, params) for i in range(batch)]
        while any(not engine.requests[i].output_token_ids for i in ids):
            engine.step()
        engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        rows = sorted(((e.key, e.count, e.device_time_total) for e in prof.key_averages()
                       if e.device_time_total > 0), key=lambda r: -r[2])
        total = sum(r[2] for r in rows) / args.steps
        print(f"\n{args.model}, batch {batch}, context {args.context}: {total / 1e3:.3f} ms of kernels per step")
        print(f"{'us/step':>9} {'calls':>6} {'share':>6}  kernel")
        for name, count, t in rows[:16]:
            print(f"{t / args.steps:>9.1f} {count // args.steps:>6} {t / args.steps / total:>6.1%}  {name[:80]}")
        for i in ids:
            engine.abort_request(i)


if __name__ == "__main__":
    main()
