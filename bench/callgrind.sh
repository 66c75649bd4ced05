#!/usr/bin/env bash
# Server instructions per Predict call, counted by callgrind: steadier than req/s on a busy machine
# (runs differ by about 2% here: gRPC's threads wake on timers). The checkout TREE's mnist-serve runs under valgrind with
# instrumentation off; after WARMUP (100) warm-up calls it is on while CALLS sequential Predict calls of
# BATCH images each run, then off. Every thread of the server counts (gRPC's included).
#
#   [WARMUP=N] bench/callgrind.sh TREE MODEL_REPO MODEL_NAME [CALLS] [BATCH]
#   bench/callgrind.sh /tmp/main-6feecb6 out/bench-repo mnist 300 1
set -euo pipefail
tree=$(cd "$1" && pwd) repo=$2 name=$3 calls=${4:-300} batch=${5:-1}
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
export PYTHONPATH=$tree/core:$tree/protos:$tree/server:$tree/client:$tree/trainer
out=$(mktemp -d)
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/callgrind.out" \
  "$PY" -m digitserve.server --model-repo "$repo" --model-name "$name" --host 127.0.0.1 \
  --port "$port" --metrics-port -1 --reload-interval 0 >"$out/server.log" 2>&1 &
pid=$!
load() {  # N sequential Predict calls of $batch images
  "$PY" - "127.0.0.1:$port" "$1" "$batch" <<'PYTHON'
import sys
import grpc
import numpy as np
from digitserve.v1 import digit_service_pb2 as pb, digit_service_pb2_grpc as pb_grpc
target, n, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = np.random.default_rng(0).random((b, 784), dtype=np.float32)
request = pb.PredictRequest(images=[pb.Image(float32=row.tobytes()) for row in rows])
with grpc.insecure_channel(target) as channel:
    predict = pb_grpc.DigitServiceStub(channel).Predict
    for _ in range(n):
        assert len(predict(request, timeout=120).predictions) == b
PYTHON
}
"$PY" -m digitserve.client --target "127.0.0.1:$port" --wait 600 health >/dev/null
load "${WARMUP:-100}"
callgrind_control -i on "$pid" >/dev/null 2>&1
load "$calls"
callgrind_control -i off "$pid" >/dev/null 2>&1
kill -TERM "$pid"
wait "$pid" || true
ir=$(grep -o "Collected : [0-9]*" "$out/server.log" | awk '{print $3}')
echo "$tree: $batch image(s) per call, $calls calls: $((ir / calls)) instructions per call (server)"
rm -rf "$out"
