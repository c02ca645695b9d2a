#!/usr/bin/env bash
# One entry point that sets everything up, then runs what you ask:
#   ./saepipe.sh repro        run the whole pipeline (prepare -> ... -> evaluate) on the embedded defaults
#   ./saepipe.sh test         run the test suite
#   ./saepipe.sh <cmd ...>    run any command inside the project environment (e.g. dvc exp run -S sae.k=64)
# Set-up (idempotent, quick when already done, no root needed): uv (from PyPI if missing), then
# `uv sync --frozen`. On Linux the first `import saepipe` then proves the bundled OpenBLAS builds on
# this CPU in a child process and loads the fastest that passes (saepipe/_blas.py).
set -euo pipefail
cd "$(dirname "$0")"

log() { printf 'saepipe.sh: %s\n' "$*" >&2; }

ensure_uv() {
  if command -v uv >/dev/null 2>&1; then UV=(uv); return; fi
  local tools=".tools/uv"
  if [ ! -x "$tools/bin/uv" ]; then
    log "installing uv into $tools (from PyPI)"
    local py; py=$(command -v python3 || command -v python) || { log "need python3 to bootstrap uv"; exit 1; }
    "$py" -m venv "$tools" && "$tools/bin/python" -m pip install -q --disable-pip-version-check uv
  fi
  UV=("$tools/bin/uv")
}

ensure_uv
"${UV[@]}" sync --frozen --quiet

cmd="${1:-repro}"; [ $# -gt 0 ] && shift
case "$cmd" in
  repro) "${UV[@]}" run --frozen dvc repro "$@"
         "${UV[@]}" run --frozen python -m stages.summary ;;
  test)  "${UV[@]}" run --frozen pytest "$@" ;;
  *)     "${UV[@]}" run --frozen "$cmd" "$@" ;;
esac
