#!/usr/bin/env bash
# One entry point that sets everything up, then runs what you ask:
#   ./saepipe.sh repro        run the whole pipeline (prepare -> ... -> summary) on the embedded defaults
#   ./saepipe.sh test         run the test suite
#   ./saepipe.sh <cmd ...>    run any command inside the project environment (e.g. dvc exp run -S sae.k=64)
# Optional extras (pyproject's [project.optional-dependencies], e.g. wandb) stay installed across calls:
#   ./saepipe.sh --extra wandb <cmd ...>   install it and remember it (in .saepipe/extras)
#   ./saepipe.sh --no-extras <cmd ...>     forget every remembered extra
#   SAEPIPE_EXTRAS="wandb" ./saepipe.sh    add extras for this call only
# NVIDIA GPUs on Linux: `--extra cuda12` (or cuda13) swaps MLX's CPU backend for its CUDA one (the
# dependency groups of pyproject.toml: `cpu` by default, exactly one of cpu/cuda12/cuda13).
# Set-up (idempotent, quick when already done, no root needed): uv (from PyPI if missing), then
# `uv sync --frozen`. On Linux the first `import saepipe` then proves the bundled OpenBLAS builds on
# this CPU in a child process and loads the fastest that passes (saepipe/runtime/blas.py).
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

# Test-only tools from the system's packages: a headless browser for the dashboard tests and, on
# x86-64, QEMU's user-mode emulator for the tests that run saepipe's native code on other CPU levels.
# Installed when apt can be used (root or password-less sudo); otherwise those tests are skipped
# with this warning and their reason (set SAEPIPE_SKIP_*_TESTS=0 to make them fail instead).
ensure_test_tools() {
  local missing=()
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
  [ "$(uname -m)" != x86_64 ] || command -v qemu-x86_64 >/dev/null 2>&1 || missing+=(qemu-user)
  [ ${#missing[@]} -gt 0 ] || return 0
  local sudo=()
  [ "$(id -u)" = 0 ] || { sudo -n true 2>/dev/null && sudo=(sudo -n); }
  if { [ "$(id -u)" = 0 ] || [ ${#sudo[@]} -gt 0 ]; } && command -v apt-get >/dev/null 2>&1; then
    log "installing test tools: ${missing[*]} (apt)"
    if "${sudo[@]}" apt-get update -qq >/dev/null && \
       DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
      return 0
    fi
  fi
  log "warning: could not install ${missing[*]}; the tests that need them are skipped"
  for tool in "${missing[@]}"; do
    case "$tool" in
      chromium) export SAEPIPE_SKIP_BROWSER_TESTS="${SAEPIPE_SKIP_BROWSER_TESTS:-1}" ;;
      qemu-user) export SAEPIPE_SKIP_EMULATION_TESTS="${SAEPIPE_SKIP_EMULATION_TESTS:-1}" ;;
    esac
  done
}

# Extras: remembered ones, those given with --extra (remembered from now on) and $SAEPIPE_EXTRAS.
# `uv sync --frozen` removes what the lock's selection lacks, so they must be named on every sync.
EXTRAS_FILE=.saepipe/extras
while [ $# -gt 0 ]; do
  case "$1" in
    --extra) [ $# -ge 2 ] || { log "--extra needs a name (e.g. --extra wandb)"; exit 2; }
             mkdir -p .saepipe; grep -qx "$2" "$EXTRAS_FILE" 2>/dev/null || echo "$2" >> "$EXTRAS_FILE"; shift 2 ;;
    --no-extras) rm -f "$EXTRAS_FILE"; shift ;;
    *) break ;;
  esac
done
extras=()
for name in $(cat "$EXTRAS_FILE" 2>/dev/null) ${SAEPIPE_EXTRAS:-}; do
  case "$name" in
    cuda12|cuda13) extras+=(--no-group cpu --group "$name") ;;  # an MLX backend: a dependency group
    *) extras+=(--extra "$name") ;;
  esac
done

ensure_uv
"${UV[@]}" sync --frozen --quiet "${extras[@]}"

cmd="${1:-repro}"; [ $# -gt 0 ] && shift
case "$cmd" in
  repro) "${UV[@]}" run --frozen "${extras[@]}" saepipe repro "$@" ;;  # dvc repro, then the results
  test)  ensure_test_tools
         "${UV[@]}" run --frozen "${extras[@]}" pytest "$@" ;;
  *)     "${UV[@]}" run --frozen "${extras[@]}" "$cmd" "$@" ;;
esac
