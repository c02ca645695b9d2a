"""Generation speed (tokens/s) of the default model, with the KV cache and without (recomputing the
whole sequence for every new token), clean and under one steer.

    ./saepipe.sh python benchmarks/generate.py [--tokens 40] [--rounds 3] [--prompt "..."]

Greedy, end-of-sequence ignored so every run makes ``--tokens`` tokens. Methods run in interleaved
rounds and the best round counts (a busy machine hurts every method alike). The steer is a random
unit direction at layer 6's MLP output (a hand-made SAE: the cost of an ``Add`` edit does not depend
on what the direction means). Also reports mlx-lm's own ``generate_step`` for reference, and whether
the cached and recomputed runs chose the same tokens.

Results, dated: docs/performance.md.
"""

from __future__ import annotations

import time

import click

import saepipe  # noqa: F401  (fast BLAS before mlx)


@click.command()
@click.option("--tokens", default=40, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--prompt", default="The history of the city begins with", show_default=True)
def main(tokens: int, rounds: int, prompt: str) -> None:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from saepipe.analysis.steering import Steer, generate
    from saepipe.lm.model import load_model
    from saepipe.sae.topk import TopKSAE

    loaded = load_model("default")
    info = loaded.info
    sae = TopKSAE(info.d_model, 2, 8, metadata={"layer": 6, "component": "mlp", "model_hash": info.model_hash})
    steer = [Steer(sae, 3, 8.0)]
    prompt_tokens = loaded.tokenizer.encode(prompt)

    def mlx_lm_run() -> tuple[float, list[int]]:
        started = time.perf_counter()
        out = []
        for (token, _), _ in zip(generate_step(mx.array(prompt_tokens), loaded.model), range(tokens), strict=False):
            out.append(int(token))
        return time.perf_counter() - started, out

    methods = {
        "saepipe, KV cache": lambda: generate(loaded, prompt, [], max_tokens=tokens, cache=True, stop_at_eos=False),
        "saepipe, recompute": lambda: generate(loaded, prompt, [], max_tokens=tokens, cache=False, stop_at_eos=False),
        "saepipe, KV cache, steered": lambda: generate(loaded, prompt, steer, max_tokens=tokens, cache=True,
                                                       stop_at_eos=False),
        "saepipe, recompute, steered": lambda: generate(loaded, prompt, steer, max_tokens=tokens, cache=False,
                                                        stop_at_eos=False),
    }
    best: dict[str, float] = {}
    tokens_of: dict[str, list[int]] = {}
    for name, fn in methods.items():  # warm-up: compiled kernels, first-touch of the weights
        tokens_of[name] = fn().tokens
    mlx_lm_run()
    for r in range(rounds):
        for name, fn in methods.items():
            g = fn()
            best[name] = min(best.get(name, float("inf")), g.seconds)
            click.echo(f"  round {r + 1}: {name:<34} {g.seconds:7.2f} s", err=True)
        seconds, mlx_tokens = mlx_lm_run()
        best["mlx-lm generate_step (KV cache)"] = min(best.get("mlx-lm generate_step (KV cache)", float("inf")),
                                                      seconds)
        click.echo(f"  round {r + 1}: {'mlx-lm generate_step':<34} {seconds:7.2f} s", err=True)
    click.echo(f"{info.model_id}: prompt {len(prompt_tokens)} tokens, {tokens} new tokens, best of {rounds} rounds, "
               f"device {mx.default_device()}")
    for name, seconds in best.items():
        click.echo(f"  {name:<34} {seconds:7.2f} s  {tokens / seconds:7.1f} tok/s")
    same = tokens_of["saepipe, KV cache"] == tokens_of["saepipe, recompute"]
    click.echo(f"cached and recomputed runs chose the same tokens: {same}; mlx-lm's too: "
               f"{tokens_of['saepipe, KV cache'] == mlx_tokens}")
    click.echo(f"text: {loaded.tokenizer.decode(tokens_of['saepipe, KV cache'])!r}")


if __name__ == "__main__":
    main()
