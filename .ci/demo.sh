#!/usr/bin/env bash
# The main job end to end: venv, install, fetch MNIST, train the default preset (or reuse the newest
# published version; MNIST_RETRAIN=1 trains a new one), serve it, predict one test image, evaluate the
# 10k test set, stop the server, and end on the accuracy line. The port and the tools are checked
# first (.ci/demo-check.py), so a taken port stops it in seconds with one line.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MNIST_DATA:-data} REPO=${MNIST_MODEL_REPO:-models} NAME=${MNIST_MODEL_NAME:-mnist}
PORT=${MNIST_PORT:-50051} PRESET=${MNIST_PRESET:-default} OUT=${MNIST_OUT:-out}
VENV=${VENV:-.venv} PYTHON=${PYTHON:-python3}
BIN=$VENV/bin
step() { printf '\n== %s\n' "$*"; }
fail() { printf 'make demo: %s\n' "$*" >&2; exit 1; }

command -v make >/dev/null || fail "needs make: install it (apt-get install make)"
command -v "$PYTHON" >/dev/null || fail "needs $PYTHON (3.11 or newer): install it, or name one with PYTHON="
PORT=$PORT VENV=$VENV "$PYTHON" .ci/demo-check.py

# What the demo runs (server, trainer, the evaluate plot), not the dev and load-test extras;
# a venv that `make venv` installed in full is used as it is.
if make -s -q "$BIN/.installed" VENV="$VENV" PYTHON="$PYTHON" 2>/dev/null; then
  step "use $VENV (installed)"
else
  step "install into $VENV"
  make -s demo-venv VENV="$VENV" PYTHON="$PYTHON"
fi
step "fetch MNIST into $DATA/"
$BIN/mnist-train fetch --data-dir "$DATA"
mkdir -p "$OUT"
newest=$($BIN/python -c 'import sys
from digitserve.repository import ModelRepository
versions = ModelRepository(sys.argv[1]).versions(sys.argv[2])
print(versions[-1] if versions else "")' "$REPO" "$NAME")
if [[ -n $newest && ${MNIST_RETRAIN:-0} != 1 ]]; then
  step "reuse $NAME version $newest in $REPO/ (MNIST_RETRAIN=1 trains a new one)"
else
  step "train preset '$PRESET' into $REPO/$NAME/"
  $BIN/mnist-train train --data-dir "$DATA" --model-repo "$REPO" --model-name "$NAME" --preset "$PRESET" \
    --json >"$OUT/train.json"
  $BIN/python -c 'import json, sys; s = json.load(open(sys.argv[1]))
print("published {name} version {version}: {path} (report: {report})".format(**s))' "$OUT/train.json"
fi
step "serve on 127.0.0.1:$PORT (log: $OUT/server.log)"
$BIN/mnist-serve --model-repo "$REPO" --model-name "$NAME" --port "$PORT" 2>"$OUT/server.log" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do  # our server's health, while it runs (not another's on the same port)
  kill -0 $server 2>/dev/null || fail "the server stopped: $(tail -n 1 "$OUT/server.log")"
  $BIN/mnist-client --target "127.0.0.1:$PORT" health --wait 1 >/dev/null 2>&1 && break
done
$BIN/mnist-client --target "127.0.0.1:$PORT" health
step "predict test image 0"
$BIN/mnist-client --target "127.0.0.1:$PORT" predict --data-dir "$DATA" --index 0
step "evaluate the 10,000 test images"
$BIN/mnist-client --target "127.0.0.1:$PORT" evaluate --data-dir "$DATA" --plot "$OUT/confusion_matrix.png" \
  >"$OUT/evaluate.txt"
tail -n +2 "$OUT/evaluate.txt"
kill -TERM $server
wait $server || fail "the server exited with status $?: see $OUT/server.log"
trap - EXIT
echo
head -n 1 "$OUT/evaluate.txt"  # the accuracy line, last
