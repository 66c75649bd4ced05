#!/usr/bin/env bash
# The API checked like a public API: `buf lint` (STANDARD rules, protos/buf.yaml) on protos/ and
# `buf breaking` (FILE rules) against protos/ as of the previous commit, so a change that would
# break other services' generated clients fails CI. buf comes from npm (@bufbuild/buf, pinned
# below), installed on first use into out/buf/ (ignored). BUF_AGAINST=REV compares against another
# commit instead of HEAD~1 (e.g. BUF_AGAINST=origin/main for a pull request).
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
PREFIX=out/buf
BUF=$PREFIX/node_modules/.bin/buf

if [[ ! -x $BUF || "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
  if ! command -v npm >/dev/null; then
    echo "buf: npm not found; install Node.js and npm to get @bufbuild/buf $BUF_VERSION" >&2
    exit 1
  fi
  # The package's postinstall script only re-checks the binary that its optional dependency
  # (@bufbuild/buf-linux-x64 and the like) already ships.
  npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --ignore-scripts \
    --loglevel=error "@bufbuild/buf@$BUF_VERSION"
fi

"$BUF" lint protos
echo "buf lint: protos/ passes (STANDARD)"

against=${BUF_AGAINST:-HEAD~1}
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "buf breaking: skipped: not a git checkout, so no previous commit to compare protos/ with"
  exit 0
fi
if ! rev=$(git rev-parse -q --verify "$against^{commit}"); then
  if [[ -n ${BUF_AGAINST:-} ]]; then
    echo "buf breaking: BUF_AGAINST=$BUF_AGAINST is not a commit in this clone" >&2
    exit 1
  fi
  shallow=""
  [[ $(git rev-parse --is-shallow-repository) == true ]] && shallow=" (a shallow clone: fetch with --depth 2 or more to check)"
  echo "buf breaking: skipped: the previous commit (HEAD~1) is not in this clone$shallow"
  exit 0
fi
if ! git ls-tree -r --name-only "$rev" -- protos | grep -q '\.proto$'; then
  echo "buf breaking: skipped: $against ($rev) has no .proto file under protos/"
  exit 0
fi
"$BUF" breaking protos --against ".git#ref=$rev,subdir=protos"
echo "buf breaking: protos/ keeps compatibility with $against ($rev)"
