#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf Python code from protos/. `--check` fails if it was stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=protos --pyi_out=protos --grpc_python_out=protos \
  protos/digitserve/v1/*.proto protos/digitserve/oip/*.proto
if [ "${1:-}" = "--check" ]; then
  if ! git diff --exit-code -- protos/ || [ -n "$(git ls-files --others --exclude-standard protos/)" ]; then
    echo "generated code in protos/ is stale: run .ci/gen-protos.sh and commit the result" >&2
    exit 1
  fi
fi
