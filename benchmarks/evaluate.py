"""Evaluate throughput (scored tokens/s) of the default model, fast path vs the straightforward
path (``evaluate_sae(fast=False)``: file-order batches, every pass from the embedding, edited
passes on one stream), side by side in one run, with the metrics of both compared.

    uv run python benchmarks/evaluate.py [--texts data/prepare/texts.parquet] [--sae PATH]
        [--max-tokens 1000] [--batch-size 8] [--layer 6] [--component mlp]

Without --sae a random TopKSAE (x16, k=32) is scored. Run on a quiet machine: both paths use
both cores, so any other load slows them alike only roughly.

Results, dated: docs/performance.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

import saepipe  # noqa: F401  (fast BLAS before mlx)


@click.command()
@click.option("--texts", "texts_path", default="data/prepare/texts.parquet", show_default=True,
              type=click.Path(path_type=Path))
@click.option("--sae", "sae_path", default=None, type=click.Path(path_type=Path))
@click.option("--max-tokens", default=1000, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--layer", default=6, show_default=True)
@click.option("--component", default="mlp", show_default=True)
@click.option("--skip-slow", is_flag=True, help="time the fast path only")
def main(texts_path: Path, sae_path: Path | None, max_tokens: int, batch_size: int, layer: int,
         component: str, skip_slow: bool) -> None:
    from saepipe.activations.extract import read_split
    from saepipe.evaluation.evaluate import evaluate_sae
    from saepipe.lm.model import load_model
    from saepipe.sae.topk import TopKSAE, load_sae

    loaded = load_model("default")
    sae = load_sae(sae_path) if sae_path else TopKSAE(int(loaded.info.d_model), 16, 32)
    texts = read_split(texts_path, "eval")[1]
    args = dict(layer=layer, component=component, max_tokens=max_tokens, batch_size=batch_size,
                context_length=128, skip_special_tokens=True)
    results, rates = {}, {}
    for fast in ([True] if skip_slow else [True, False]):
        t0 = time.perf_counter()
        results[fast] = evaluate_sae(loaded, sae, texts, fast=fast, **args).to_dict()
        rates[fast] = max_tokens / (time.perf_counter() - t0)
        print(f"fast={fast}: {rates[fast]:.1f} scored tok/s", flush=True)
    if not skip_slow:
        print(f"speed-up fast/straightforward: {rates[True] / rates[False]:.2f}x")
        worst = max(abs(results[True][k] - results[False][k]) / max(1e-12, abs(results[False][k]))
                    for k in results[False] if isinstance(results[False][k], float))
        print(f"largest relative metric difference: {worst:.2e}")


if __name__ == "__main__":
    main()
