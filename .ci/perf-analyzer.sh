#!/usr/bin/env bash
# perf_analyzer, Triton's load tester, for tests/interop/test_perf_analyzer.py and
# bench/perf_analyzer.py, in a virtual environment of its own (the project's venv keeps its newer
# tritonclient): the tritonclient 2.34.0 wheel ships the binary (bin/perf_analyzer; later wheels
# need glibc 2.38), which needs libb64 (Debian's libb64-0d) and libcudart.so.12 (the
# nvidia-cuda-runtime-cu12 wheel; no GPU is used). Only the binary is wanted, so both wheels are
# installed without their Python dependencies. bench/perf-analyzer runs it with LD_LIBRARY_PATH
# set. Idempotent: an environment whose binary already runs is kept. On failure one line says
# what failed (pip's output is kept in DIR/install.log) and it exits 1.
#
#   .ci/perf-analyzer.sh [DIR]        (default: .perf-venv, where bench/perf-analyzer looks)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.perf-venv}
tritonclient=2.34.0
cudart=12.9.79

fail() {
  echo "perf-analyzer: $*" >&2
  exit 1
}

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "perf-analyzer: installing libb64-0d with apt-get" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null; } \
      || fail "apt-get install libb64-0d failed"
  else
    fail "libb64.so.0d is missing: apt-get install libb64-0d (as root) and run this again"
  fi
fi

# The binary runs when its usage text comes out (it exits 99 after any usage text, --help included).
runs() {
  local usage
  usage=$(PERF_VENV=$dir bench/perf-analyzer --help 2>&1 || true)
  [[ $usage == *SYNOPSIS* ]]
}

if runs; then
  echo "perf-analyzer: tritonclient $tritonclient's perf_analyzer in $dir (kept)" >&2
  exit 0
fi
mkdir -p "$dir"
log=$dir/install.log
"${PYTHON:-python3}" -m venv "$dir" >"$log" 2>&1 || fail "python3 -m venv $dir failed (see $log)"
"$dir/bin/pip" install --disable-pip-version-check --no-deps "tritonclient==$tritonclient" \
  "nvidia-cuda-runtime-cu12==$cudart" >>"$log" 2>&1 \
  || fail "pip install tritonclient==$tritonclient nvidia-cuda-runtime-cu12==$cudart failed: $(grep -m1 ERROR "$log" || tail -1 "$log") (see $log)"
runs || fail "$dir/bin/perf_analyzer does not run: $(PERF_VENV=$dir bench/perf-analyzer --help 2>&1 | head -1)"
echo "perf-analyzer: tritonclient $tritonclient's perf_analyzer installed in $dir" >&2
