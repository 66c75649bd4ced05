#!/usr/bin/env bash
# The client-only install (`pip install .`, no extra) in a fresh virtual environment: only the
# `digitserve` package is installed, the client imports without TensorFlow, hpack (the loadtest
# extra) is not installed, and the commands whose extra is missing (mnist-serve, mnist-train train,
# mnist-client loadtest) exit 2 with one line naming it instead of a traceback; mnist-serve --help
# shows the help and that line, exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=out/client-only-venv
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q .
cd out  # not the checkout: its folders must not be what gets imported
V=client-only-venv/bin
fail() { echo "client-only install: $*" >&2; exit 1; }

for name in server client trainer; do
  if "$V/python" -c "import $name" 2>/dev/null; then fail "'import $name' works: a top-level $name is installed"; fi
done
"$V/python" -c "import digitserve.client, digitserve.repository, digitserve.v1.digit_service_pb2" \
  || fail "the client does not import"
mkdir -p digitserve/client  # a folder of the package's name beside the script (a clone) does not shadow it
"$V/python" -c "import digitserve, sys; from digitserve.client import DigitClient; sys.exit(digitserve.__file__ is None)" \
  || fail "digitserve is not a regular package, or a folder named digitserve shadows it"
rmdir digitserve/client digitserve
"$V/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is not None)" \
  || fail "TensorFlow is installed without an extra"
"$V/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('hpack') is not None)" \
  || fail "hpack (the loadtest extra's) is installed without the extra"
# What went into site-packages (the scripts, listed as ../../../bin/..., are not imports).
tops=$("$V/pip" show -f digitserve | grep -v '^  \.\./' | sed -n 's|^  \([^/]*\)/.*|\1|p' | sort -u | tr '\n' ' ')
case $tops in "digitserve digitserve-"*".dist-info ") ;; *) fail "top-level folders installed: $tops" ;; esac
"$V/mnist-client" --help > /dev/null || fail "mnist-client --help failed"

expect_extra() {  # expect_extra EXTRA COMMAND...: exit 2, one line on stderr naming the extra
  local extra=$1; shift
  set +e; err=$("$@" 2>&1 >/dev/null); code=$?; set -e
  [ "$code" = 2 ] || fail "'$*' exited $code, expected 2: $err"
  [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] || fail "'$*' printed more than one line: $err"
  case $err in *"pip install 'digitserve[$extra]'"*) ;; *) fail "'$*' does not name the $extra extra: $err" ;; esac
  echo "$*: $err"
}
expect_extra serve "$V/mnist-serve" --model-repo models
# mnist-serve --help still shows the help (exit 0), and the line that says how to install the server.
set +e; help=$("$V/mnist-serve" --help 2>serve-help.err); code=$?; set -e
[ "$code" = 0 ] || fail "'mnist-serve --help' exited $code, expected 0: $(cat serve-help.err)"
case $help in "usage: mnist-serve"*) ;; *) fail "'mnist-serve --help' shows no help: $help" ;; esac
case $(cat serve-help.err) in *"pip install 'digitserve[serve]'"*) ;; *) fail "'mnist-serve --help' does not name the serve extra: $(cat serve-help.err)" ;; esac
echo "mnist-serve --help: $(cat serve-help.err)"
expect_extra trainer "$V/mnist-train" train --data-dir data --model-repo models --model-name mnist
expect_extra loadtest "$V/mnist-client" loadtest --data-dir data --duration 1
"$V/mnist-train" --help > /dev/null || fail "mnist-train --help failed"
echo "client-only install: OK (top level: $tops)"
