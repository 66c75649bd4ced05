#!/bin/sh
# Entrypoint of the digitserve image: one image serves, trains or runs the client.
#
#   serve [FLAGS]            mnist-serve, configured by MNIST_* variables (the default command)
#   fetch [FLAGS]            mnist-train fetch into $MNIST_DATA_DIR (a no-op when the files verify)
#   train [FLAGS]            mnist-train train from $MNIST_DATA_DIR into $MNIST_MODEL_REPO
#   fetch-and-train [FLAGS]  fetch, then train (FLAGS go to train)
#   evaluate [FLAGS]         mnist-client evaluate on $MNIST_DATA_DIR against $MNIST_TARGET
#   loadtest [FLAGS]         mnist-client loadtest against $MNIST_TARGET
#   health                   exit 0 iff the server in this container reports SERVING
#   client ARGS              mnist-client ARGS
#   anything else            run as given (mnist-train --help, python, sh ...)
#
# Variables: MNIST_DATA_DIR, MNIST_MODEL_REPO, MNIST_MODEL_NAME, MNIST_PRESET, MNIST_EPOCHS,
# MNIST_SEED, MNIST_TARGET, MNIST_MIN_ACCURACY, MNIST_LOADTEST_CONCURRENCY,
# MNIST_LOADTEST_DURATION, MNIST_PORT; mnist-serve reads its own MNIST_* variables.
set -eu

fetch() {
  mnist-train fetch --data-dir "${MNIST_DATA_DIR:-/data}" "$@"
}

train() {
  set -- --data-dir "${MNIST_DATA_DIR:-/data}" --model-repo "${MNIST_MODEL_REPO:-/models}" \
    --name "${MNIST_MODEL_NAME:-mnist}" --preset "${MNIST_PRESET:-default}" \
    ${MNIST_EPOCHS:+--epochs "$MNIST_EPOCHS"} ${MNIST_SEED:+--seed "$MNIST_SEED"} "$@"
  exec mnist-train train "$@"
}

command=${1:-serve}
[ "$#" -eq 0 ] || shift
case $command in
  serve) exec mnist-serve "$@" ;;
  fetch) fetch "$@" ;;
  train) train "$@" ;;
  fetch-and-train) fetch; train "$@" ;;
  evaluate) exec mnist-client evaluate --data-dir "${MNIST_DATA_DIR:-/data}" "$@" ;;
  loadtest)
    exec mnist-client loadtest --data-dir "${MNIST_DATA_DIR:-/data}" \
      --concurrency "${MNIST_LOADTEST_CONCURRENCY:-8}" --duration "${MNIST_LOADTEST_DURATION:-30}" \
      "$@" ;;
  health) exec mnist-client --target "127.0.0.1:${MNIST_PORT:-50051}" --timeout 3 health ;;
  client) exec mnist-client "$@" ;;
  *) exec "$command" "$@" ;;
esac
