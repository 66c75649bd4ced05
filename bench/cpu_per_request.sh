#!/usr/bin/env bash
# Server CPU per request (default: 1 image each, 64 in flight), split by thread name: the null
# server against mnist-serve, driven by the same load tester.
#
#   bench/cpu_per_request.sh MODEL_REPO MODEL_NAME VERSION [DATA_DIR] [SECONDS] [BATCH] [IN_FLIGHT]
#
# Prints, per server: requests, req/s, and CPU microseconds per request for each thread group
# (mnist-serve's Python threads, TensorFlow's compute threads, gRPC's event engine).
set -euo pipefail
repo=$1 name=$2 version=$3 data=${4:-data} seconds=${5:-6} batch=${6:-1} inflight=${7:-64}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")

measure() {  # label port command...
  local label=$1 port=$2; shift 2
  "$@" --port "$port" 2>/dev/null &
  local pid=$!
  "$BIN/mnist-client" --target "127.0.0.1:$port" health --wait 90 >/dev/null 2>&1 || sleep 3
  snap() { for t in /proc/$pid/task/*; do echo "$(basename "$t") $(tr ' ' _ <"$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done | sort; }
  snap >/tmp/cpu_per_request.$$.0
  local result
  result=$("$BIN/mnist-client" --target "127.0.0.1:$port" loadtest --data-dir "$data" \
    --concurrency "$inflight" --batch "$batch" --duration "$seconds" --encoding float32 --json \
    2>/dev/null |
    "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["requests"], d["rps"])')
  snap >/tmp/cpu_per_request.$$.1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local requests=${result% *} hz
  hz=$(getconf CLK_TCK)
  echo "$label: $requests requests, ${result#* } req/s; server CPU µs per request by thread:"
  join /tmp/cpu_per_request.$$.0 /tmp/cpu_per_request.$$.1 |
    awk -v n="$requests" -v hz="$hz" '{a[$2]+=$5-$3} END {t=0; for (k in a) {printf "  %-14s %6.0f\n", k, a[k]*1e6/hz/n; t+=a[k]}; printf "  %-14s %6.0f\n", "total", t*1e6/hz/n}'
  rm -f /tmp/cpu_per_request.$$.*
}

measure "null server" 50181 "$PY" -m bench.null_server
measure "mnist-serve" 50182 "$BIN/mnist-serve" --model-repo "$repo" --model-name "$name" \
  --model-version "$version" --metrics-port -1 --reload-interval 0
measure "mnist-serve, access log off" 50183 "$BIN/mnist-serve" --model-repo "$repo" \
  --model-name "$name" --model-version "$version" --metrics-port -1 --reload-interval 0 \
  --log-level WARNING
