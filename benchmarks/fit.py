"""``fit_sae`` throughput end to end (tokens/s of training steps, reading included) on random
activations: one process, or every rank of an ``mlx.launch`` group (data-parallel).

    uv run python benchmarks/fit.py [--rows 65536] [--d-model 576] [--expansion 16] [--k 32]
        [--batch 4096] [--steps 12] [--kernels auto]
    mlx.launch -n 2 --backend ring -- python benchmarks/fit.py ...    # 2 ranks on this machine

A short warm-up fit (kernel compilation, first-touch memory) runs first; the timed fit is the
second. Each rank prints its line; with several ranks the global batch is ``--batch`` (each rank
steps on its part), so tokens/s are global. On one machine ranks share its cores: give each rank
its share of threads (e.g. ``NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`` for 2 ranks on 2 cores).

Results, dated: docs/performance.md.
"""

from __future__ import annotations

import time

import click


@click.command()
@click.option("--rows", default=65536, show_default=True, help="activation rows (random normal)")
@click.option("--d-model", default=576, show_default=True)
@click.option("--expansion", default=16, show_default=True)
@click.option("--k", default=32, show_default=True)
@click.option("--batch", default=4096, show_default=True, help="global batch (rows per step, all ranks)")
@click.option("--steps", default=12, show_default=True, help="timed steps")
@click.option("--kernels", default="auto", show_default=True)
def main(rows: int, d_model: int, expansion: int, k: int, batch: int, steps: int, kernels: str) -> None:
    import saepipe  # noqa: F401, I001  (fast BLAS before mlx)
    import mlx.core as mx
    import numpy as np

    from saepipe.parallel.ranks import Ranks
    from saepipe.sae.config import SAEConfig
    from saepipe.training.fit import fit_sae
    from saepipe.training.steps import resolve_kernels

    ranks = Ranks.world()
    acts = np.random.default_rng(0).standard_normal((rows, d_model), dtype=np.float32)
    config = SAEConfig(expansion_factor=expansion, k=k, batch_size=batch, num_epochs=1, warmup_steps=1,
                       validation_split=0.0)
    fit_sae(acts, config, max_steps=2, kernels=kernels, ranks=ranks, progress=False)  # warm-up
    t0 = time.perf_counter()
    result = fit_sae(acts, config, max_steps=steps, kernels=kernels, ranks=ranks, progress=False)
    wall = time.perf_counter() - t0
    s = result.summary
    print(f"rank {ranks.rank}/{ranks.size} on {mx.default_device()} ({resolve_kernels(kernels)} kernels): "
          f"{s['steps']} steps of {batch} rows (d_model {d_model}, d_hidden {d_model * expansion}, k {k}): "
          f"{s['tok_per_s']:.0f} tok/s in steps, {s['tokens'] / wall:.0f} tok/s with set-up", flush=True)


if __name__ == "__main__":
    main()
