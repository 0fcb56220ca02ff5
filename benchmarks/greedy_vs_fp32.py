"""Is a greedy difference between us and transformers (both bf16) a rounding near-tie? Fed the
same sequences (prompt + our greedy output), our tokens, transformers-bf16's argmax and an fp32
run of the same weights are compared position by position. Usage, on a GPU (about 50 GB):

    python3 benchmarks/greedy_vs_fp32.py [--model dummy:llama3-8b]

Prints how often each bf16 run picks fp32's argmax, which side fp32 takes where the two bf16
runs differ, and fp32's top-1 - top-2 logit margin there against everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_gpu import forced_logits, random_prompts  # noqa: E402
from pdserve.engine.engine import Engine  # noqa: E402
from pdserve.engine.hf_reference import hf_model_sharing  # noqa: E402
from pdserve.engine.sampling_params import SamplingParams  # noqa: E402

NUM, PROMPT_LEN, OUTPUT_LEN = 16, 512, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama3-8b")
    args = ap.parse_args()
    engine = Engine(model=args.model, device="cuda", dtype="bfloat16", max_num_seqs=NUM,
                    num_kv_blocks=NUM * (PROMPT_LEN + OUTPUT_LEN) // 16 + 64)
    prompts = random_prompts(engine.model_config.vocab_size, NUM, PROMPT_LEN, seed=7)
    ours = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True))
    outputs = [c.token_ids for c in ours]
    hf = hf_model_sharing(engine.runner.model, engine.model_config)
    mine, logits = forced_logits(hf, prompts, outputs)  # mine: our greedy tokens [NUM, OUTPUT_LEN]
    hf_bf16 = logits.argmax(dim=-1)
    del engine, logits
    torch.cuda.empty_cache()
    _, logits = forced_logits(hf.float(), prompts, outputs)  # fp32 copies of the weights
    fp32 = logits.argmax(dim=-1)
    top2 = logits.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    differ = mine != hf_bf16
    print(f"{args.model}, {mine.numel()} positions (ours and transformers fed the same sequences)")
    print(f"  ours picks fp32's argmax        {(mine == fp32).float().mean():.1%}")
    print(f"  transformers bf16 picks it      {(hf_bf16 == fp32).float().mean():.1%}")
    print(f"  ours == transformers bf16       {(~differ).float().mean():.1%}")
    if differ.any():
        print(f"  where they differ ({int(differ.sum())}): fp32 sides with ours "
              f"{(mine[differ] == fp32[differ]).float().mean():.0%}, with transformers "
              f"{(hf_bf16[differ] == fp32[differ]).float().mean():.0%}")
        print(f"  fp32 top-1 - top-2 margin: median {margin.median():.4f} everywhere, "
              f"{margin[differ].median():.4f} where they differ (|top logit| median "
              f"{top2[..., 0].abs().median():.2f})")


if __name__ == "__main__":
    main()
