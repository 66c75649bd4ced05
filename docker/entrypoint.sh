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
# Every option of mnist-serve, mnist-train and mnist-client is also an MNIST_* variable (see each
# command's --help); this script only sets the image's defaults: MNIST_DATA_DIR (/data),
# MNIST_MODEL_REPO (/models), MNIST_MODEL_NAME (mnist), and for loadtest
# MNIST_LOADTEST_CONCURRENCY (8) and MNIST_LOADTEST_DURATION (30). MNIST_PORT names the port the
# health command probes.
set -eu

: "${MNIST_DATA_DIR:=/data}" "${MNIST_MODEL_REPO:=/models}" "${MNIST_MODEL_NAME:=mnist}"
export MNIST_DATA_DIR MNIST_MODEL_REPO MNIST_MODEL_NAME

command=${1:-serve}
[ "$#" -eq 0 ] || shift
case $command in
  serve) exec mnist-serve "$@" ;;
  fetch) exec mnist-train fetch "$@" ;;
  train) exec mnist-train train "$@" ;;
  fetch-and-train) mnist-train fetch; exec mnist-train train "$@" ;;
  evaluate) exec mnist-client evaluate "$@" ;;
  loadtest)
    : "${MNIST_LOADTEST_CONCURRENCY:=8}" "${MNIST_LOADTEST_DURATION:=30}"
    export MNIST_LOADTEST_CONCURRENCY MNIST_LOADTEST_DURATION
    exec mnist-client loadtest "$@" ;;
  health) exec mnist-client --target "127.0.0.1:${MNIST_PORT:-50051}" --timeout 3 health ;;
  client) exec mnist-client "$@" ;;
  *) exec "$command" "$@" ;;
esac
