#!/usr/bin/env bash
# One entry point that sets everything up, then runs what you ask:
#   ./saepipe.sh repro        run the whole pipeline (prepare -> ... -> evaluate) on the embedded defaults
#   ./saepipe.sh test         run the test suite
#   ./saepipe.sh <cmd ...>    run any command inside the project environment (e.g. dvc exp run -S sae.k=64)
# Set-up (idempotent, quick when already done): uv (from PyPI if missing), on Linux libgfortran5 for
# the bundled OpenBLAS (apt, when run as root or with password-less sudo), then `uv sync --frozen`.
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

ensure_fast_blas_runtime() {
  [ "$(uname -s)" = Linux ] || return 0
  # grep without -q reads all of ldconfig's output: with -q, ldconfig may die of SIGPIPE and pipefail
  # would report the library missing.
  if ldconfig -p 2>/dev/null | grep 'libgfortran\.so\.5' >/dev/null; then return 0; fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      log "warning: libgfortran5 is missing and this user cannot install it; MLX will use the slow"
      log "reference BLAS. Fix: sudo apt-get install libgfortran5"; return 0; fi
  fi
  if command -v apt-get >/dev/null 2>&1; then
    log "installing libgfortran5 (needed by the bundled OpenBLAS)"
    "${sudo[@]}" apt-get update -qq >/dev/null && \
      DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq libgfortran5 >/dev/null || \
      log "warning: could not install libgfortran5; MLX will use the slow reference BLAS"
  elif command -v dnf >/dev/null 2>&1; then
    "${sudo[@]}" dnf install -y -q libgfortran || log "warning: could not install libgfortran"
  fi
}

ensure_uv
ensure_fast_blas_runtime
"${UV[@]}" sync --frozen --quiet

cmd="${1:-repro}"; [ $# -gt 0 ] && shift
case "$cmd" in
  repro) "${UV[@]}" run --frozen dvc repro "$@"
         "${UV[@]}" run --frozen python -m stages.summary ;;
  test)  "${UV[@]}" run --frozen pytest "$@" ;;
  *)     "${UV[@]}" run --frozen "$cmd" "$@" ;;
esac
