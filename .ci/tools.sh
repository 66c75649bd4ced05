#!/usr/bin/env bash
# The programs the tests need beside the Python packages of `make venv` (whose extras bring
# tritonclient[http], matplotlib, hpack and scikit-learn): curl (the docs' curl lines,
# tests/server/test_http.py), node and npm (the Node.js client, tests/client/test_node_client.py;
# npm also for .ci/buf.sh). Installed with apt-get where they are missing and this runs as root on
# a Debian or Ubuntu machine; otherwise one line names what is missing and how to get it (exit 1).
# Under `make test` (MNIST_REQUIRE_E2E=1) a test whose tool is missing fails instead of skipping,
# so CI runs this first (.ci/run). Also says the open-files limit the tests need (1,300: the
# idle-connection flood of tests/server/test_flood.py); .ci/run raises it.
set -euo pipefail

missing() {
  local tool need=()
  for tool in curl node npm; do
    command -v "$tool" >/dev/null || need+=("$tool")
  done
  echo "${need[@]}"
}

need=$(missing)
if [ -n "$need" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  packages=()
  for tool in $need; do
    case $tool in
      curl) packages+=(curl) ;;
      node) packages+=(nodejs) ;;
      npm) packages+=(npm) ;;
    esac
  done
  echo "tools: installing ${packages[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  need=$(missing)
fi
if [ -n "$need" ]; then
  echo "tools: $need not installed; the tests need them (apt-get install curl nodejs npm, or Node.js >= 18.3 from nodejs.org)" >&2
  exit 1
fi
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt 1300 ]; then
  echo "tools: the open-files hard limit is $hard; tests/server/test_flood.py needs 1300 (ulimit -Hn 4096 as root)" >&2
  exit 1
fi
echo "tools: curl $(curl --version | head -1 | cut -d' ' -f2), node $(node --version), npm $(npm --version), open files up to $hard" >&2
