"""Default-model load time and forward throughput: float32 (the CPU policy) vs kept quantization.

    uv run python benchmarks/model_load.py [--batch 8] [--seq 128] [--quant-seq 16]

Targets on Linux CPU: load_model("default") in a few seconds; float32 forward / quantized forward
tokens/s ratio >> 1 on one short sequence (the reason ``load_model`` dequantizes on CPU; MLX's
quantized/float16 CPU kernels are very slow, so the quantized model only runs that short one).
"""

from __future__ import annotations

import time

import click

import saepipe  # noqa: F401  (loads the fast BLAS before mlx)


def _forward_tok_s(model, batch: int, seq: int, repeats: int) -> float:
    import mlx.core as mx

    x = mx.random.randint(0, model.args.vocab_size, (batch, seq))
    mx.eval(model(x))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(model(x))
        best = min(best, time.perf_counter() - t0)
    return batch * seq / best


@click.command()
@click.option("--batch", default=8, show_default=True)
@click.option("--seq", default=128, show_default=True)
@click.option("--quant-seq", default=16, show_default=True,
              help="Tokens of the single sequence timed for both dtypes (quantized CPU is slow).")
@click.option("--repeats", default=3, show_default=True)
def main(batch: int, seq: int, quant_seq: int, repeats: int) -> None:
    """Print load seconds and forward tokens/s for both dtype policies."""
    t0 = time.perf_counter()
    from saepipe.lm.model import load_model

    flat = load_model("default", keep_quantized=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_model("default", keep_quantized=False)
    reload_s = time.perf_counter() - t0
    print(f"load_model('default'): {load_s:.2f} s first (with imports), {reload_s:.2f} s again")
    f32 = _forward_tok_s(flat.model, batch, seq, repeats)
    print(f"float32 forward {batch}x{seq}: {f32:,.0f} tok/s")
    f32_short = _forward_tok_s(flat.model, 1, quant_seq, repeats)
    quant = load_model("default", keep_quantized=True)
    q = _forward_tok_s(quant.model, 1, quant_seq, 1)
    print(f"forward 1x{quant_seq}: float32 {f32_short:,.1f} tok/s, kept Q4_1/Q8 {q:,.1f} tok/s, "
          f"ratio {f32_short / q:.1f}x")


if __name__ == "__main__":
    main()
