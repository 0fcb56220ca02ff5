#!/usr/bin/env bash
# One device call on one GPU (issue 29): the receiver's landing tests and the one-GPU cluster
# test, then benchmarks/serving.py on dummy:llama3-8b (cluster of one prefill and one decode
# node sharing the card, the benchmark's default connector: ipc; EXTRA="--kv-connector tcp"
# for tcp), against the in-process engine with a decode node's KV blocks, with the nodes
# profiled by py-spy at the highest rate. Its table is printed
# last; JSON, plots and the profile go to $OUT.
# Carry .whl: the test tools in .whl/*.whl, and in .whl/extra the packages the image lacks
# (for Python 3.12: grpcio, protobuf, crc32c, redis, aiohttp, openai and theirs, matplotlib and
# theirs, gguf, prometheus-client; py-spy), as gpu_nccl_check.sh says how to fetch them.
#   bash scripts/gpu_serving_check.sh [rates] [burst]
# Env: NUM_REQUESTS (per rate, 48), TESTS=0 (skip the tests) or TEST_FILES (which), NODE_ARGS
# (more flags for every node, e.g. "--device-turns off"), EXTRA (more benchmark flags, e.g.
# --no-engine), PROFILE=0 (no py-spy), NAME (the output files' stem, serving).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
rates=${1:-1,4,8,16}
burst=${2:-200}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl/extra/*.whl 2>&1 | grep -v WARN | tail -3
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
[ "${TESTS:-1}" = 0 ] || python3 -m pytest -q -s -m gpu -p no:cacheprovider ${TEST_FILES:-tests/unit/test_gpu_landing.py tests/integration/test_gpu_pipeline.py} 2>&1 | tail -6
python3 benchmarks/serving.py --model dummy:llama3-8b --device cuda:0 --rates "$rates" --burst "$burst" \
  --num-requests "${NUM_REQUESTS:-48}" --input-len 256:2048 --output-len 128 --slo-ttft 1 --slo-tpot 0.025 --max-seconds 150 \
  --node-args "${NODE_ARGS:-}" ${EXTRA:-} $([ "${PROFILE:-1}" = 0 ] || echo --profile-phase "${rates##*,}/s" --profile-seconds 10) \
  --out "$out/${NAME:-serving}.json" --plots "$out/${NAME:-serving}" 2>&1 | tee "$out/${NAME:-serving}.log" | tail -45
