#!/usr/bin/env bash
# Chats of 8 turns: KV moved per request with the decode node's prefix cache off (every turn
# resends its whole history: the measured full-resend baseline) against only the missing blocks.
cd "$(dirname "$0")/../../.."
D=benchmarks/results/cpu-smollm2-modes-issue30
B=".venv/bin/python benchmarks/serving.py --model smollm2-135m --burst 0 --plots '' --output-len 32 --slo-ttft 2 --slo-tpot 0.25 --no-engine"
W="--workload multi-turn --num-turns 8 --input-len 256:512 --turn-len 64 --rates 1 --num-requests 32 --redis"
eval timeout 500 $B $W --router-args "'--disaggregation always'" --node-args "'--enable-prefix-caching false'" --out $D/chat8-resend.json > $D/chat8-resend.log 2>&1
eval timeout 500 $B $W --router-args "'--disaggregation always'" --out $D/chat8-disagg.json > $D/chat8-disagg.log 2>&1
eval timeout 500 $B $W --router-args "'--prefill-here-max-tokens 128'" --out $D/chat8-cond.json > $D/chat8-cond.log 2>&1
echo chat8 done $(date)
