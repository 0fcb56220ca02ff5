"""Offline engine throughput against Hugging Face `generate` on the same model and prompts,
measured in the same run.

  (a) 1 prompt of 200 tokens, 64 new tokens
  (b) 16 prompts of 50-300 tokens, max_tokens spread over 16-128

transformers runs batch (b) as one left-padded batch (its best offline setting); it must
generate until the longest request is done, so only each request's own tokens count as output.
Both sides ignore EOS, so the token counts are fixed. Usage:

    python benchmarks/engine.py [--model smollm2-135m] [--device cpu] [--repeat 2]
    python benchmarks/engine.py --device cuda [--model dummy:llama3-8b,dummy:llama3.2-1b]

On CUDA it runs benchmarks/engine_gpu.py instead: decode step time against the roofline
floor, offline throughput against transformers, prefill against the matmul FLOP rate.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.hf_reference import hf_model  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402


def make_workloads(vocab_size: int, seed: int = 0):
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(100, vocab_size) for _ in range(n)]  # noqa: E731
    single = ([tokens(200)], [64])
    lengths = [rng.randrange(50, 301) for _ in range(16)]
    max_tokens = [16 + round(i * (128 - 16) / 15) for i in range(16)]
    rng.shuffle(max_tokens)
    return {"a: 1 x 200 in / 64 out": single,
            "b: 16 x 50-300 in / 16-128 out": ([tokens(n) for n in lengths], max_tokens)}


def run_ours(engine: Engine, prompts, max_tokens) -> tuple[float, list[list[int]]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    engine.kv.pool.reset_prefix_cache()  # a repeat must not hit the cache: HF has none
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert [len(r.token_ids) for r in results] == max_tokens
    return elapsed, [r.token_ids for r in results]


@torch.inference_mode()
def run_hf(model, prompts, max_tokens, device) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max(max_tokens), do_sample=False,
                         pad_token_id=0)
    _sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, [out[i, width:width + m].tolist() for i, m in enumerate(max_tokens)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side; the best counts")
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        return main_gpu(args)

    engine = Engine(model=args.model, device=args.device, max_num_batched_tokens=2048)
    hf = hf_model(engine.source, engine.model_config).to(device=device, dtype=engine.runner.dtype)
    hf.generation_config.eos_token_id = None  # like ignore_eos
    workloads = make_workloads(engine.model_config.vocab_size)
    run_ours(engine, [[100] * 16], [4])  # warm up both
    run_hf(hf, [[100] * 16], [4], device)

    rows = []
    for name, (prompts, max_tokens) in workloads.items():
        num_out = sum(max_tokens)
        ours_times, hf_times = [], []
        for _ in range(args.repeat):  # alternate, so that a noisy spell hits both sides
            ours_times.append(run_ours(engine, prompts, max_tokens)[0])
            hf_times.append(run_hf(hf, prompts, max_tokens, device)[0])
        ours_s, hf_s = min(ours_times), min(hf_times)
        _, ours_tokens = run_ours(engine, prompts[:1], max_tokens[:1])
        _, hf_tokens = run_hf(hf, prompts[:1], max_tokens[:1], device)
        rows.append({"workload": name, "output_tokens": num_out, "ours_tok_s": num_out / ours_s,
                     "hf_tok_s": num_out / hf_s, "ratio": hf_s / ours_s,
                     "greedy_match_first_prompt": ours_tokens == hf_tokens})
        print(f"{name}: ours {ours_s:.2f}s, transformers {hf_s:.2f}s", file=sys.stderr)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device,
                                          "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"\nengine throughput, {args.model} on {args.device} ({torch.get_num_threads()} threads), "
          f"best of {args.repeat}")
    print(f"{'workload':<32} {'out tok':>8} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'same tokens':>12}")
    for r in rows:
        print(f"{r['workload']:<32} {r['output_tokens']:>8} {r['ours_tok_s']:>11.1f} {r['hf_tok_s']:>9.1f} "
              f"{r['ratio']:>5.2f}x {str(r['greedy_match_first_prompt']):>12}")


def main_gpu(args) -> None:
    from benchmarks.engine_gpu import bench_model, print_tables
    models = args.model if args.model != "smollm2-135m" else "dummy:llama3-8b,dummy:llama3.2-1b"
    results = [bench_model(m) for m in models.split(",")]
    out = Path(args.out).with_name("engine_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=2))
    print_tables(results)


if __name__ == "__main__":
    main()
