#!/usr/bin/env bash
# The virtual environment of the benchmark's KServe row (bench/kserve_server.py): KServe pins its
# own grpcio, protobuf and web stack, so it lives apart from the project's environment.
#
#   bench/kserve-venv.sh [DIR]        (default: out/kserve-venv, where `python -m bench` looks)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-out/kserve-venv}
"${PYTHON:-python3}" -m venv "$dir"
"$dir/bin/pip" install --quiet --disable-pip-version-check "kserve==0.21.0" "ai-edge-litert==2.3.0" "tensorflow-cpu==2.21.0"
"$dir/bin/python" -c 'import importlib.metadata as m; print("kserve", m.version("kserve"), "in '"$dir"'")'
