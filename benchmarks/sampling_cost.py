"""What the sampling features cost a decode step, against plain greedy in the same run.

    python benchmarks/sampling_cost.py [--model dummy:llama3-8b] [--device cuda:0] [--batch 64]

One engine; per case `--batch` requests of `--context` random prompt tokens are prefilled,
then `--steps` decode steps are timed (schedule, run, sample, read back; the mean wall time of
a step). Cases: greedy (CUDA graphs with async scheduling), greedy one step at a time (no
look-ahead: what logprobs and penalties turn off), logprobs with the top 5, the three
penalties, logit_bias with min_tokens (no look-ahead needed), and sampling at temperature 0.8
with top-p. Prints each step time and its ratio to greedy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams

CASES = {
    "greedy": dict(),
    "greedy, one step at a time": dict(),
    "logprobs top 5": dict(logprobs=5),
    "penalties (presence, frequency, repetition)": dict(presence_penalty=0.5, frequency_penalty=0.3,
                                                       repetition_penalty=1.1),
    "logit_bias + min_tokens": dict(logit_bias={100 + i: 1.0 for i in range(8)}, min_tokens=8),
    "temperature 0.8, top_p 0.9": dict(temperature=0.8, top_p=0.9),
}


def step_seconds(engine: Engine, batch: int, context: int, steps: int, fields: dict, overlap: bool) -> float:
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(**{"temperature": 0, "max_tokens": 100_000, "ignore_eos": True, **fields})
    ids = [engine.add_request([rng.randrange(100, vocab) for _ in range(context)], params) for _ in range(batch)]
    config = engine.config
    engine.config = config.replace(async_scheduling=overlap)
    try:
        while any(len(engine.requests[i].output_token_ids) < 2 for i in ids):  # prefill, warm up
            engine.step()
        sync(engine)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(engine)
        return (time.perf_counter() - start) / steps
    finally:
        engine.config = config
        for i in ids:
            engine.abort_request(i)
        while engine.has_unfinished():
            engine.step()


def sync(engine: Engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    engine = Engine(model=args.model, device=args.device)
    rows = {}
    for name, fields in CASES.items():
        overlap = name != "greedy, one step at a time"
        rows[name] = step_seconds(engine, args.batch, args.context, args.steps, fields, overlap)
        print(f"  {name}: {rows[name] * 1e3:.2f} ms", file=sys.stderr, flush=True)
    base = rows["greedy"]
    print(f"{args.model} on {args.device}, batch {args.batch}, {args.context} tokens of context")
    print(f"{'case':<46} {'step ms':>8} {'vs greedy':>10}")
    for name, seconds in rows.items():
        print(f"{name:<46} {seconds * 1e3:>8.2f} {seconds / base:>9.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "step_seconds": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
