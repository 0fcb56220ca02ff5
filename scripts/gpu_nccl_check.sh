#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (issue 7): the nccl connector's contract tests, the
# two-GPU pipeline test, the landing kernel's GPU test, then benchmarks/kv_connectors.py with 9
# reps (a run's median varies by ~0.05 between runs; its tables are printed last).
# Carry .whl (the packages the image lacks, as wheels: it has no package index), made with
#   pip download -d .whl/extra --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
#     --python-version 3.12 crc32c redis async-timeout grpcio==1.85.4 \
#     grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
# (the versions requirements/test.lock pins; grpcio and protobuf at least those the stubs in
# pdserve/protos were generated with).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --find-links .whl/extra --target /tmp/site \
  crc32c redis async-timeout grpcio grpcio-health-checking grpcio-reflection protobuf
export PYTHONPATH=/tmp/site
python3 -c "import sys, torch, grpc; print(sys.version.split()[0], 'torch', torch.__version__, 'grpc', grpc.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())"
nvidia-smi topo -m 2>/dev/null | head -4
python3 -m pytest -q -p no:cacheprovider tests/unit/test_kv_connectors.py tests/unit/test_nccl_connector.py 2>&1 | tail -3
python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/integration/test_gpu_pipeline.py 2>&1 | tee "$out/gpu_pipeline.log" | tail -15
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_kernels.py -k scatter 2>&1 | tail -2
python3 benchmarks/kv_connectors.py --reps 9 --json "$out/kv_connectors.json" 2>&1 | tee "$out/kv_connectors.log" | tail -14
