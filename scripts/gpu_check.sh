#!/usr/bin/env bash
# One device call: every `gpu` test (kernels against their references, the engine's CUDA
# graphs against eager, nothing compiled or captured in steady state, the KV cache's GPU share,
# the receiver's landings, the cluster on one GPU), then a benchmark, its table printed last:
#   bash scripts/gpu_check.sh           benchmarks/kernels.py
#   bash scripts/gpu_check.sh engine    benchmarks/engine.py --device cuda (issue 9)
# Usage on the device machine, from the repository root (carry .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
if [ -d .whl ]; then  # test tools (and in .whl/extra the runtime packages it lacks) carried as
  # wheels: the device has no package index. See gpu_nccl_check.sh for how .whl/extra is made.
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl $(ls .whl/extra/*.whl 2>/dev/null) \
    && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -s -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" | tail -25
if [ "${1:-kernels}" = engine ]; then
  python3 benchmarks/engine.py --device cuda --out "$out/engine.json" 2>&1 | tee "$out/engine.log" | tail -22
else
  python3 benchmarks/kernels.py --out "$out/kernels.json" 2>&1 | tee "$out/kernels.log" | tail -16
fi
