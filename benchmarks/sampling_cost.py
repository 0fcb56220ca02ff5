"""What the sampling features cost a decode step, against plain greedy in the same run.

    python benchmarks/sampling_cost.py [--model dummy:llama3-8b] [--device cuda:0] [--batch 64]

One engine; per case `--batch` requests of `--context` random prompt tokens are prefilled,
then `--steps` decode steps are timed (schedule, run, sample, read back; the mean wall time of
a step). Cases: greedy (CUDA graphs with async scheduling), greedy one step at a time (no
look-ahead: what logprobs and penalties turn off), logprobs with the top 5, the three
penalties, logit_bias with min_tokens (no look-ahead needed), and sampling at temperature 0.8
with top-p (a sort of the whole vocabulary) and with top-k (no sort). Prints each step time and
its ratio to greedy.

A JSON-schema case needs a vocabulary for xgrammar, which `dummy:` weights lack: make one
where a tokenizer is (`--write-grammar-vocab wide_vocab.json`: SmolLM2's 49,152 byte-level
tokens, widened to Llama-3's 128,256 by joining pairs of them, a stand-in of the same size),
carry it, and pass `--grammar-vocab wide_vocab.json`. The case then masks every row of the
batch with a grammar that stays open (an object holding a list of strings); it prints how many
rows were still held to their grammar at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from pdserve.engine.engine import Engine
from pdserve.engine.sampling_params import SamplingParams, StructuredOutput
from pdserve.engine.structured_output import Grammars

CASES = {
    "greedy": dict(),
    "greedy, one step at a time": dict(),
    "logprobs top 5": dict(logprobs=5),
    "penalties (presence, frequency, repetition)": dict(presence_penalty=0.5, frequency_penalty=0.3,
                                                       repetition_penalty=1.1),
    "logit_bias + min_tokens": dict(logit_bias={100 + i: 1.0 for i in range(8)}, min_tokens=8),
    "temperature 0.8, top_p 0.9": dict(temperature=0.8, top_p=0.9),
    "temperature 0.8, top_k 50": dict(temperature=0.8, top_k=50),
}


def step_seconds(engine: Engine, batch: int, context: int, steps: int, fields: dict, overlap: bool) -> float:
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    grammar = fields.get("structured_output") is not None  # ends with its grammar: EOS is not ignored
    params = SamplingParams(**{"temperature": 0, "max_tokens": 100_000, "ignore_eos": not grammar, **fields})
    ids = [engine.add_request([rng.randrange(100, vocab) for _ in range(context)], params) for _ in range(batch)]
    config = engine.config
    engine.config = config.replace(async_scheduling=overlap)
    try:
        while any(i in engine.requests and len(engine.requests[i].output_token_ids) < 2 for i in ids):  # warm up
            engine.step()
        sync(engine)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(engine)
        seconds = (time.perf_counter() - start) / steps
        if grammar:
            held = [engine.grammars.matchers.get(i) for i in ids]
            print(f"  rows still held to their grammar after the timed steps: "
                  f"{sum(m is not None and m.matcher is not None for m in held)} of {batch}", file=sys.stderr)
        return seconds
    finally:
        engine.config = config
        for i in ids:
            engine.abort_request(i)
        while engine.has_unfinished():
            engine.step()


GRAMMAR_CASE = "json schema grammar"
SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
          "required": ["notes"]}
WIDE_VOCAB_SIZE = 128_256


class ListVocab:
    """A vocabulary for xgrammar from a JSON list of byte-level token strings (its first
    `vocab_size`: a smaller model's)."""

    def __init__(self, path: str, vocab_size: int):
        with open(path) as f:
            self.tokens = json.load(f)[:vocab_size]

    def vocab(self) -> list[str]:
        return self.tokens

    def decoder_type(self) -> str:
        return "ByteLevel"


def write_wide_vocab(path: str) -> None:
    from pdserve.engine.model_source import resolve_model
    tokens = resolve_model("smollm2-135m").tokenizer().vocab()
    rng, seen, words = random.Random(0), set(tokens), [t for t in tokens if not t.startswith("<")]
    while len(tokens) < WIDE_VOCAB_SIZE:
        token = rng.choice(words) + rng.choice(words)
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    with open(path, "w") as f:
        json.dump(tokens, f)
    print(f"wrote {len(tokens)} tokens to {path}")


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
    ap.add_argument("--grammar-vocab", default=None, help="a JSON list of byte-level tokens: adds the grammar case")
    ap.add_argument("--write-grammar-vocab", default=None, help="write such a list (needs smollm2-135m) and exit")
    args = ap.parse_args(argv)
    if args.write_grammar_vocab:
        write_wide_vocab(args.write_grammar_vocab)
        return 0
    engine = Engine(model=args.model, device=args.device)
    cases = dict(CASES)
    if args.grammar_vocab:
        config = engine.model_config
        engine.grammars = Grammars(ListVocab(args.grammar_vocab, config.vocab_size), config.vocab_size, config.eos_token_ids)
        engine.runner.sampler.processors.grammars = engine.grammars
        cases[GRAMMAR_CASE] = dict(structured_output=StructuredOutput("json", json.dumps(SCHEMA)))
    rows = {}
    for name, fields in cases.items():
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
