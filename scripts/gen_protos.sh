#!/usr/bin/env bash
# Regenerates the Python stubs of protos/*.proto (pb2, pb2_grpc and .pyi) into OUT/pdserve/protos
# (OUT defaults to the repository root, so they land in the package). The .proto files are the
# interface and stay at the top; the stubs are generated as if the files lay in pdserve/protos/,
# so they import each other as `pdserve.protos.*`. tests/unit/test_protos.py runs this into a
# temporary directory and fails when the committed stubs differ: edit the .proto, run this,
# commit both. Needs grpcio-tools (pinned in the lock file).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$OUT/pdserve/protos"
"$PYTHON" -m grpc_tools.protoc -Ipdserve/protos=protos --python_out="$OUT" --grpc_python_out="$OUT" \
    --pyi_out="$OUT" protos/*.proto
