#!/usr/bin/env bash
# The mix workload (a third each of short prompts, long prompts and chat turns) in the three
# modes; "cond" is the router's default rule (--prefill-here-max-tokens 512).
cd "$(dirname "$0")/../../.."
D=benchmarks/results/cpu-smollm2-modes-issue30
B=".venv/bin/python benchmarks/serving.py --model smollm2-135m --burst 0 --plots '' --output-len 32 --slo-ttft 2 --slo-tpot 0.25 --no-engine"
W="--workload mix --num-turns 4 --input-len 128:256 --turn-len 64 --rates 1 --num-requests 24 --redis"
eval timeout 500 $B $W --router-args "'--disaggregation always'" --out $D/mix-disagg.json > $D/mix-disagg.log 2>&1
eval timeout 500 $B $W --num-prefill 0 --out $D/mix-agg.json > $D/mix-agg.log 2>&1
eval timeout 500 $B $W --out $D/mix-cond.json > $D/mix-cond.log 2>&1
echo mix done $(date)
