"""MLX vs numpy float32 GEMM throughput, side by side in one run.

    uv run python benchmarks/blas.py [--n 2048] [--repeats 5]

Target on Linux: MLX/numpy >= 0.8 after the README's set-up (saepipe loads OpenBLAS before MLX).
"""

from __future__ import annotations

import time

import click

import saepipe  # noqa: F401  (loads the fast BLAS before mlx)
from saepipe.runtime import blas


def _best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@click.command()
@click.option("--n", default=2048, show_default=True, help="Square matrix size.")
@click.option("--repeats", default=5, show_default=True)
def main(n: int, repeats: int) -> None:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ma, mb = mx.array(a), mx.array(b)
    mx.eval(ma, mb)
    flops = 2.0 * n**3
    t_mlx = _best_seconds(lambda: mx.eval(ma @ mb), repeats)
    t_np = _best_seconds(lambda: a @ b, repeats)
    g_mlx, g_np = flops / t_mlx / 1e9, flops / t_np / 1e9
    print(f"BLAS loaded for MLX: {blas.loaded_path or 'none (bundled reference BLAS)'}")
    selection = blas.selection
    for candidate, verdict in (selection.report if selection else []):
        speed = selection.gflops.get(candidate.path)
        state = "passed the probe" if verdict.ok else f"rejected: {verdict.reason}"
        if speed is not None:
            state += f", {speed:.1f} GFLOP/s in the race"
        print(f"  candidate {candidate.name:17s} {state}")
    print(f"sgemm {n}x{n}x{n}: MLX {g_mlx:8.1f} GFLOP/s | numpy {g_np:8.1f} GFLOP/s | "
          f"ratio MLX/numpy {g_mlx / g_np:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
