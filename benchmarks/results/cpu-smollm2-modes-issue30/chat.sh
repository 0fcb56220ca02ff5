#!/usr/bin/env bash
cd /work/main
B=".venv/bin/python benchmarks/serving.py --model smollm2-135m --burst 0 --plots '' --output-len 32 --slo-ttft 2 --slo-tpot 0.25"
W="--workload multi-turn --num-turns 4 --input-len 256:512 --turn-len 64 --rates 1 --num-requests 24 --redis"
eval timeout 400 $B $W --router-args "'--disaggregation always'" --out benchmarks/results/cpu-smollm2-modes-issue30/chat-disagg.json > benchmarks/results/cpu-smollm2-modes-issue30/chat-disagg.log 2>&1
eval timeout 400 $B $W --num-prefill 0 --no-engine --out benchmarks/results/cpu-smollm2-modes-issue30/chat-agg.json > benchmarks/results/cpu-smollm2-modes-issue30/chat-agg.log 2>&1
eval timeout 400 $B $W --router-args "'--prefill-here-max-tokens 128'" --no-engine --out benchmarks/results/cpu-smollm2-modes-issue30/chat-cond.json > benchmarks/results/cpu-smollm2-modes-issue30/chat-cond.log 2>&1
echo chat2 done $(date)
