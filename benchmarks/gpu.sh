#!/usr/bin/env bash
# saepipe on an NVIDIA GPU (Linux): install MLX's CUDA backend in place of its CPU one and run the
# benchmarks there, printing absolute numbers (training step, fit_sae end to end, extraction,
# evaluation). Needs an NVIDIA driver (CUDA 12: driver >= 525; CUDA 13: >= 580) and network access
# to PyPI (MLX's CUDA wheels and NVIDIA's libraries, ~3 GB).
#
#   benchmarks/gpu.sh            # CUDA 12 build
#   SAEPIPE_CUDA=cuda13 benchmarks/gpu.sh
#
# The project environment keeps the CUDA backend afterwards for commands run as
# `SAEPIPE_EXTRAS=cuda12 ./saepipe.sh <cmd>` (or remember it: `./saepipe.sh --extra cuda12 <cmd>`);
# a plain `./saepipe.sh <cmd>` switches it back to the CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda="${SAEPIPE_CUDA:-cuda12}"
run() { SAEPIPE_EXTRAS="$cuda" ./saepipe.sh "$@"; }
say() { printf '\n== %s\n' "$*"; }

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || \
  echo "gpu.sh: nvidia-smi not found (no NVIDIA driver?); MLX will say whether it sees a GPU" >&2

say "MLX backend ($cuda)"
run python -c "
import saepipe, mlx.core as mx
print('mlx', mx.__version__, 'default device:', mx.default_device(), 'cuda available:', mx.cuda.is_available())
assert mx.default_device().type == mx.DeviceType.gpu, 'MLX does not compute on a GPU: check the driver / the CUDA build'
"
run saepipe info

say "training step (batch 4096, d_model 576, x16, AuxK on with 5% dead latents; best of 5)"
run python benchmarks/train.py --no-peers --k 32 --k 64 --repeats 5

say "sparse-step formulations (benchmarks/mlx_step.py)"
run python benchmarks/mlx_step.py --repeats 5

say "fit_sae end to end (random activations, 64k rows; tokens/s of the steps)"
run python benchmarks/fit.py --steps 16
run python benchmarks/fit.py --steps 16 --d-model 2048 --expansion 16 --k 64 --batch 8192 --rows 131072

say "extraction: default model to layer 15 (no transformers comparison here)"
run python benchmarks/extract.py --torch-python /nonexistent --rounds 5

say "evaluation: default model, fast path (needs the prepared texts: the prepare stage)"
[ -f data/prepare/texts.parquet ] || run dvc repro prepare
run python benchmarks/evaluate.py --skip-slow --max-tokens 4000 --batch-size 32
