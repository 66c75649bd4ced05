#!/bin/sh
# Entrypoint of the digitserve images (serve: the default target; train: --target train).
#
#   serve [FLAGS]            mnist-serve, configured by MNIST_* variables (the serve image's default
#                            command): every model of $MNIST_MODEL_REPO unless MNIST_MODEL_NAME
#                            names some; waits for a first version when there is none
#   evaluate [FLAGS]         mnist-client evaluate on $MNIST_DATA_DIR against $MNIST_TARGET
#   loadtest [FLAGS]         mnist-client loadtest against $MNIST_TARGET
#   health                   exit 0 iff the server in this container reports SERVING
#   client ARGS              mnist-client ARGS
# train image only (the serve image has no TensorFlow and says so):
#   fetch [FLAGS]            mnist-train fetch into $MNIST_DATA_DIR (a no-op when the files verify)
#   train [FLAGS]            mnist-train train from $MNIST_DATA_DIR into $MNIST_MODEL_REPO
#   fetch-and-train [FLAGS]  fetch, then train (FLAGS go to train; the train image's default)
#   anything else            run as given (mnist-serve --help, python, sh ...)
#
# Every option of mnist-serve, mnist-train and mnist-client is also an MNIST_* variable (see each
# command's --help); this script only sets the images' defaults: MNIST_DATA_DIR (/data),
# MNIST_MODEL_REPO (/models), for the trainer MNIST_MODEL_NAME (mnist), and for loadtest
# MNIST_LOADTEST_CONCURRENCY (8) and MNIST_LOADTEST_DURATION (30). MNIST_PORT names the port the
# health command probes. DIGITSERVE_IMAGE (serve or train) is set by the image.
set -eu

: "${MNIST_DATA_DIR:=/data}" "${MNIST_MODEL_REPO:=/models}"
export MNIST_DATA_DIR MNIST_MODEL_REPO

command=${1:-serve}
[ "$#" -eq 0 ] || shift

trainer() {  # the trainer's commands, in the image that has it
  if [ "${DIGITSERVE_IMAGE:-train}" = serve ]; then
    echo "docker-entrypoint: '$command' needs TensorFlow, which the serve image does not have: run it in the digitserve-train image (docker build --target train -t digitserve-train .)" >&2
    exit 2
  fi
  : "${MNIST_MODEL_NAME:=mnist}"
  export MNIST_MODEL_NAME
}

case $command in
  serve) exec mnist-serve "$@" ;;
  fetch) trainer; exec mnist-train fetch "$@" ;;
  train) trainer; exec mnist-train train "$@" ;;
  fetch-and-train) trainer; mnist-train fetch; exec mnist-train train "$@" ;;
  evaluate) exec mnist-client evaluate "$@" ;;
  loadtest)
    : "${MNIST_LOADTEST_CONCURRENCY:=8}" "${MNIST_LOADTEST_DURATION:=30}"
    export MNIST_LOADTEST_CONCURRENCY MNIST_LOADTEST_DURATION
    exec mnist-client loadtest "$@" ;;
  health) exec mnist-client --target "127.0.0.1:${MNIST_PORT:-50051}" --timeout 3 health ;;
  client) exec mnist-client "$@" ;;
  *) exec "$command" "$@" ;;
esac
