#!/usr/bin/env bash
# The main job end to end on a fresh machine: venv, install, fetch MNIST, train the default preset,
# serve it, predict one test image, evaluate the 10k test set, print the accuracy, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MNIST_DATA:-data} REPO=${MNIST_MODEL_REPO:-models} NAME=${MNIST_MODEL_NAME:-mnist}
PORT=${MNIST_PORT:-50051} PRESET=${MNIST_PRESET:-default} OUT=${MNIST_OUT:-out}
BIN=.venv/bin
step() { printf '\n== %s\n' "$*"; }

step "install into .venv"
make -s venv
step "fetch MNIST into $DATA/"
$BIN/mnist-train fetch --data-dir "$DATA"
step "train preset '$PRESET' into $REPO/$NAME/"
mkdir -p "$OUT"
$BIN/mnist-train train --data-dir "$DATA" --model-repo "$REPO" --model-name "$NAME" --preset "$PRESET" \
  --json >"$OUT/train.json"
cat "$OUT/train.json"
step "serve on 127.0.0.1:$PORT"
$BIN/mnist-serve --model-repo "$REPO" --model-name "$NAME" --port "$PORT" 2>"$OUT/server.log" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
$BIN/mnist-client --target "127.0.0.1:$PORT" health --wait 120 || { cat "$OUT/server.log"; exit 1; }
step "predict test image 0"
$BIN/mnist-client --target "127.0.0.1:$PORT" predict --data-dir "$DATA" --index 0
step "evaluate the 10,000 test images"
$BIN/mnist-client --target "127.0.0.1:$PORT" evaluate --data-dir "$DATA" --plot "$OUT/confusion_matrix.png"
step "stop the server"
kill -TERM $server
wait $server
trap - EXIT
tail -n 3 "$OUT/server.log"
report=$($BIN/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["path"])' "$OUT/train.json")/report
printf '\nreport: %s\n' "$report"
ls "$report"
