"""The `pdserve` command.

    pdserve up         start pdserve locally; until the services land (the serving issue),
                       this loads the in-process engine and answers a sample chat
    pdserve generate   answer one prompt with the in-process engine, streaming the text
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from engine.config import EngineConfig
from pdserve.config_args import add_config_args, config_from_args

SAMPLE_CHAT = "Give me three short tips for writing clear code."

HELP = {
    "model": "a Hugging Face directory, a .gguf file, smollm2-135m, or dummy:<preset|config.json>",
    "device": "cpu or cuda[:N]",
    "dtype": "auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16, float16",
    "block_size": "tokens per KV block",
    "num_kv_blocks": "KV blocks to allocate (none: from --kv-cache-memory-gb)",
    "max_num_batched_tokens": "token budget of one engine step (chunked prefill)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with disaggregated "
                                     "prefill and decode")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run pdserve locally (for now: the in-process engine on a sample chat)")
    gen = sub.add_parser("generate", help="answer one prompt with the in-process engine")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    for p in (up, gen):
        add_config_args(p, EngineConfig, HELP, exclude=("keep_logits",))
        p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
        p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(EngineConfig, args)
        prompt = SAMPLE_CHAT if args.command == "up" else args.prompt
        return run_prompt(config, prompt, raw=getattr(args, "raw", False),
                          max_tokens=args.max_tokens, temperature=args.temperature)
    except ValueError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_prompt(config: EngineConfig, prompt: str, raw: bool, max_tokens: int, temperature: float) -> int:
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams

    print(f"loading {config.model} on {config.device} ...", file=sys.stderr)
    start = time.monotonic()
    engine = Engine(config)
    print(f"loaded in {time.monotonic() - start:.1f}s", file=sys.stderr)
    if engine.tokenizer is None:
        raise ValueError(f"model {config.model!r} has no tokenizer; use a real model for text prompts")
    tokens = (engine.tokenizer.encode(prompt) if raw
              else engine.tokenizer.encode_chat([{"role": "user", "content": prompt}]))
    request_id = engine.add_request(tokens, SamplingParams(temperature=temperature, max_tokens=max_tokens))
    print(f"> {prompt}\n", file=sys.stderr)
    start, output, printed = time.monotonic(), [], ""
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                output += out.new_token_ids
        text = engine.tokenizer.decode(output)
        if not text.endswith("\ufffd"):  # hold back a half-decoded UTF-8 character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    elapsed = time.monotonic() - start
    print(f"\n\n[{len(output)} tokens in {elapsed:.2f}s, {len(output) / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
