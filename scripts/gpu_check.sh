#!/usr/bin/env bash
# One device call: every `gpu` test, then the kernel benchmark (its table is printed last).
# Usage on the device machine, from the repository root: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
if [ -d .whl ]; then  # test tools carried as wheels (the device has no package index)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels 2>&1 | tee "$out/gpu_tests.log" | tail -25
python3 benchmarks/kernels.py --out "$out/kernels.json" 2>&1 | tee "$out/kernels.log" | tail -16
