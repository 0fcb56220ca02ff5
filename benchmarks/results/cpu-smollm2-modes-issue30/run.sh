#!/usr/bin/env bash
cd /work/main
B=".venv/bin/python benchmarks/serving.py --model smollm2-135m --burst 0 --plots '' --output-len 32 --slo-ttft 2 --slo-tpot 0.25"
declare -A W
W[short]="--workload random --input-len 32:128 --rates 2 --num-requests 24"
W[long]="--workload random --input-len 512:1024 --rates 0.5 --num-requests 12"
W[chat]="--workload multi-turn --num-turns 4 --input-len 256:512 --turn-len 64 --rates 1 --num-requests 24"
for w in short long chat; do
  eval timeout 400 $B ${W[$w]} --redis --router-args "'--disaggregation always'" --out benchmarks/results/cpu-smollm2-modes-issue30/$w-disagg.json > benchmarks/results/cpu-smollm2-modes-issue30/$w-disagg.log 2>&1
  eval timeout 400 $B ${W[$w]} --redis --num-prefill 0 --no-engine --out benchmarks/results/cpu-smollm2-modes-issue30/$w-agg.json > benchmarks/results/cpu-smollm2-modes-issue30/$w-agg.log 2>&1
  eval timeout 400 $B ${W[$w]} --redis --router-args "'--prefill-here-max-tokens 128'" --no-engine --out benchmarks/results/cpu-smollm2-modes-issue30/$w-cond.json > benchmarks/results/cpu-smollm2-modes-issue30/$w-cond.log 2>&1
  echo "$w done $(date)"
done
