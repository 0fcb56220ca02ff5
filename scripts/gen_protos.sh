#!/usr/bin/env bash
# Regenerates the Python stubs of protos/*.proto (pb2, pb2_grpc and .pyi) into OUT (default:
# the repository root, so they land in protos/). tests/unit/test_protos.py runs this into a
# temporary directory and fails when the committed stubs differ: edit the .proto, run this,
# commit both. Needs grpcio-tools (pinned in pyproject's test extra).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$OUT/protos"
"$PYTHON" -m grpc_tools.protoc -I . --python_out="$OUT" --grpc_python_out="$OUT" \
    --pyi_out="$OUT" protos/*.proto
