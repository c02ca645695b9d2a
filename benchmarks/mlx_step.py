"""The formulations behind saepipe.sae.sparse and saepipe.training.mlx_step, side by side, each as a
multiple of the encoder matmul.

    uv run python benchmarks/mlx_step.py [--k 32] [--batch 4096] [--d-model 576] [--expansion 16]

Rows (all on one (batch, d_hidden) problem; interleaved repeats, best time):
- floor: ``x @ W_enc.T``; top-k: ``mx.argpartition`` over all columns vs ``topk_indices`` (two-stage,
  default and other block sizes); decoder: dense masked matmul vs chunked gather (several chunk
  sizes) vs one unchunked gather; weight gradient: dense code matmul vs scatter-add.
"""

from __future__ import annotations

import time

import click


@click.command()
@click.option("--k", default=32, show_default=True)
@click.option("--batch", "n", default=4096, show_default=True)
@click.option("--d-model", default=576, show_default=True)
@click.option("--expansion", default=16, show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(k: int, n: int, d_model: int, expansion: int, repeats: int) -> None:
    import saepipe  # noqa: F401, I001  (fast BLAS before mlx)
    import mlx.core as mx
    import numpy as np

    from saepipe.sae import sparse
    from saepipe.training import mlx_step as so

    h = d_model * expansion
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((n, d_model), dtype=np.float32))
    W = mx.array(rng.standard_normal((h, d_model), dtype=np.float32) / np.sqrt(d_model))
    pre = x @ W.T
    idx = sparse.topk_indices(pre, k)
    v = mx.maximum(mx.take_along_axis(pre, idx, axis=-1), 0)
    g = x * 0.01
    mx.eval(pre, idx, v, g)
    block = sparse.default_block(h, k)
    fns = {
        "floor: x @ W_enc.T": lambda: x @ W.T,
        "topk: argpartition (all columns)": lambda: mx.argpartition(pre, kth=h - k, axis=-1)[:, h - k:],
        f"topk: two-stage, block {block} (default)": lambda: sparse.topk_indices(pre, k),
        "topk: two-stage, block 8": lambda: sparse.topk_indices(pre, k, 8),
        "topk: two-stage, block 32": lambda: sparse.topk_indices(pre, k, 32),
        "decode: dense code @ W_dec": lambda: sparse.to_dense(v, idx, h) @ W,
        "decode: gather, default chunks": lambda: sparse.decode_rows(v, idx, W),
        "decode: gather, 128-row chunks": lambda: sparse.decode_rows(v, idx, W, 128),
        "decode: gather, unchunked": lambda: sparse.decode_rows(v, idx, W, n),
        "values grad: gather, default chunks": lambda: so.decode_values_grad(g, idx, W),
        "values grad: dense g @ W_dec.T + take": lambda: mx.take_along_axis(g @ W.T, idx, axis=-1),
        "weight grad: dense code matmul": lambda: so.rows_grad(v, idx, g, h, "dense"),
        "weight grad: scatter-add": lambda: so.rows_grad(v, idx, g, h, "scatter"),
    }
    best = {}
    for name, fn in fns.items():
        mx.eval(fn())
        best[name] = float("inf")
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            mx.eval(fn())
            best[name] = min(best[name], time.perf_counter() - t0)
    floor = best["floor: x @ W_enc.T"]
    print(f"batch {n}, d_model {d_model}, d_hidden {h}, k {k}; best of {repeats}")
    for name, t in best.items():
        print(f"  {name:42s} {t * 1e3:9.1f} ms {t / floor:7.2f}x floor")


if __name__ == "__main__":
    main()
