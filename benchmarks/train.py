"""TopK-SAE training-step throughput: saepipe vs the dense-matmul floor and PyTorch peers, one run.

    uv run python benchmarks/train.py [--k 32 --k 64] [--batch 4096] [--dead-fraction 0.05]
                                      [--peer-python /tmp/benchvenv/bin/python]

For each k it prints tokens/s of (all with AuxK on: ``--dead-fraction`` of the latents are dead):

- floor: one dense encoder matmul of the batch, ``x @ W_enc.T`` (n x d_model x d_hidden);
- cpu_step: ``saepipe.training.cpu_step.CpuStep.step``, what ``fit_sae`` runs on a CPU (MLX encoder
  matmul + multi-threaded numba kernels), and the floor are timed inside ``reuse_freed_memory`` as in
  ``fit_sae``, interleaved, with 3x the repeats;
- reference: the dense MLX step (``saepipe.training.reference``, ``kernels="reference"``);
- mlx_step (dense): ``saepipe.training.mlx_step.make_train_step``, ``fit_sae``'s path on a GPU
  (``--all-variants`` adds its scatter-add weight gradients);
- peers, each through its own classes, in a subprocess of ``--peer-python``: EleutherAI sparsify
  (``SparseCoder`` forward with ``dead_mask`` + backward + decoder-gradient projection + Adam step +
  decoder renorm) and SAELens (``TopKTrainingSAE.training_forward_pass`` + backward + Adam step);
  skipped with a message when not importable there.

Targets (issue): full step <= 1.5x the floor, and >= 2x sparsify's tok/s with AuxK on.

Results, dated: docs/performance.md.

Installing the peers into a throwaway venv (never the project venv; CPU torch only):

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.13.0          # the CPU wheel from the package index
    /tmp/benchvenv/bin/pip install --no-deps eai-sparsify sae-lens
    /tmp/benchvenv/bin/pip install simple-parsing einops safetensors transformers accelerate \\
        natsort schedulefree datasets huggingface_hub    # sparsify's imports
    /tmp/benchvenv/bin/pip install "transformer-lens>=2.16.1,<4" plotly plotly-express nltk \\
        "babe>=0.0.7,<0.0.8" python-dotenv tenacity pyyaml    # SAELens' imports (its pins)
    /tmp/benchvenv/bin/pip install "numpy>=2" "pandas>=2.2.3"   # pyarrow needs numpy 2; pandas built for it
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click


def _best(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function; the functions are interleaved so load spikes hit all alike."""
    best = {}
    for name, fn in fns.items():
        fn()  # warm-up (compile)
        best[name] = float("inf")
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _mlx_times(k: int, n: int, d_model: int, expansion: int, dead_fraction: float, repeats: int,
               all_variants: bool) -> dict:
    import saepipe  # noqa: F401, I001  (fast BLAS before mlx)
    import mlx.core as mx
    import numpy as np

    from saepipe.runtime.memory import reuse_freed_memory
    from saepipe.sae.config import SAEConfig
    from saepipe.sae.topk import init_params
    from saepipe.training import cpu_step
    from saepipe.training import mlx_step as so
    from saepipe.training.reference import make_reference_step
    from saepipe.training.state import TrainState

    d_hidden = d_model * expansion
    k_aux = d_model // 2
    config = SAEConfig(k=k, expansion_factor=expansion, batch_size=n, dead_tokens_threshold=10**6)
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((n, d_model), dtype=np.float32))
    params = init_params(d_model, d_hidden, False, 0)
    zeros = {name: mx.zeros_like(p) for name, p in params.items()}
    n_dead = round(dead_fraction * d_hidden)
    counter = np.zeros(d_hidden, np.int32)
    counter[rng.choice(d_hidden, n_dead, replace=False)] = config.dead_tokens_threshold
    counter = mx.array(counter)
    args = (params, zeros, dict(zeros), mx.array(0.0), mx.array(1e-4), x, mx.zeros((d_model,)),
            mx.ones((d_model,)), counter, mx.array(min(n_dead / k_aux, 1.0)))
    mx.eval(args)
    W_enc = params["W_enc"]
    floor = {"floor": lambda: mx.eval(x @ W_enc.T)}
    steps = {}
    naive = make_reference_step(config, d_hidden, k_aux, n_dead > 0)
    steps["reference"] = lambda: mx.eval(naive(*args))
    capacity = so.aux_capacity(n_dead, d_hidden)
    methods = ["dense", "scatter"] if all_variants else ["dense"]  # dense: what fit_sae(kernels="sparse") runs
    for method in methods:
        fast = so.make_train_step(config, d_hidden, k_aux, capacity, method=method)
        steps[f"mlx_step ({method})"] = lambda fast=fast: mx.eval(fast(*args))
    if cpu_step.available():
        cpu = cpu_step.CpuStep(config, d_hidden, k_aux, TrainState(*args[:4], counter))
        dead_counter = cpu.counter.copy()

        def run_cpu():
            cpu.counter[:] = dead_counter  # the same dead latents every time (the others are functional)
            cpu.step(1e-4, x, args[6], args[7], n_dead)

        floor["cpu_step"] = run_cpu
    # As fit_sae runs them: inside reuse_freed_memory (big buffers reused, not page-faulted in).
    # The fast pair (the ratio that matters) gets more repeats, interleaved; then the slow steps.
    with reuse_freed_memory():
        return {**_best(floor, 3 * repeats), **_best(steps, repeats)}


# --------------------------------------------------------------------------------------------------
# Peers (run in a subprocess of --peer-python; torch only, no mlx)
# --------------------------------------------------------------------------------------------------
def _peer_sparsify(k, n, d_model, expansion, dead_fraction, repeats):
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    d_hidden = d_model * expansion
    sae = SparseCoder(d_model, SparseCoderConfig(expansion_factor=expansion, k=k), device="cpu",
                      dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(n, d_model)
    dead = torch.zeros(d_hidden, dtype=torch.bool)
    dead[torch.randperm(d_hidden)[: round(dead_fraction * d_hidden)]] = True

    def step():
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=False)
        sae.set_decoder_norm_to_unit_norm()

    return _best({"sparsify": step}, repeats)["sparsify"]


def _peer_sae_lens(k, n, d_model, expansion, dead_fraction, repeats):
    import torch
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(0)
    d_hidden = d_model * expansion
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_model, d_sae=d_hidden, k=k, dtype="float32",
                                                device="cpu", aux_loss_coefficient=1 / 32))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(n, d_model)
    dead = torch.zeros(d_hidden, dtype=torch.bool)
    dead[torch.randperm(d_hidden)[: round(dead_fraction * d_hidden)]] = True

    def step():
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return _best({"sae_lens": step}, repeats)["sae_lens"]


_PEERS = {"sparsify": _peer_sparsify, "sae_lens": _peer_sae_lens}


def _peer_time(python: str, peer: str, k, n, d_model, expansion, dead_fraction, repeats) -> float | str:
    """Seconds per step of a peer, or the reason it could not run."""
    cmd = [python, str(Path(__file__).resolve()), "--peer", peer, "--k", str(k), "--batch", str(n),
           "--d-model", str(d_model), "--expansion", str(expansion), "--dead-fraction", str(dead_fraction),
           "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"skipped ({last})"
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


@click.command()
@click.option("--k", "ks", multiple=True, type=int, default=(32, 64), show_default=True)
@click.option("--batch", "n", default=4096, show_default=True)
@click.option("--d-model", default=576, show_default=True)
@click.option("--expansion", default=16, show_default=True)
@click.option("--dead-fraction", default=0.05, show_default=True, help="Dead latents (AuxK on when > 0).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--peer-python", default=sys.executable, show_default=True,
              help="Interpreter with torch (+ sparsify / sae_lens) for the peers.")
@click.option("--peers/--no-peers", default=True, show_default=True)
@click.option("--all-variants", is_flag=True, help="Also time mlx_step's scatter-add weight gradients.")
@click.option("--peer", type=click.Choice(sorted(_PEERS)), hidden=True)
def main(ks, n, d_model, expansion, dead_fraction, repeats, peer_python, peers, all_variants, peer):
    if peer:  # subprocess mode: one peer, one k; JSON on stdout
        seconds = _PEERS[peer](ks[0], n, d_model, expansion, dead_fraction, repeats)
        print(json.dumps({"seconds": seconds}))
        return
    print(f"batch {n}, d_model {d_model}, d_hidden {d_model * expansion}, AuxK on with "
          f"{dead_fraction:.0%} dead latents; best of {repeats} (interleaved)")
    # All of saepipe's timings first, then the peers: each peer is a big torch subprocess whose
    # exit leaves the kernel busy reclaiming memory for a while (our steps ran slower after one).
    results = {k: _mlx_times(k, n, d_model, expansion, dead_fraction, repeats, all_variants) for k in ks}
    for k in ks:
        times = results[k]
        if peers:
            for name in _PEERS:
                times[name] = _peer_time(peer_python, name, k, n, d_model, expansion, dead_fraction, repeats)
    for k in ks:
        times = results[k]
        floor = times["floor"]
        print(f"\nk = {k}")
        print(f"  {'':24s} {'ms/step':>9s} {'tok/s':>9s} {'x floor':>8s}")
        for name, t in times.items():
            if isinstance(t, str):
                print(f"  {name:24s} {t}")
                continue
            print(f"  {name:24s} {t * 1e3:9.1f} {n / t:9.0f} {t / floor:8.2f}")
        ours = {name: t for name, t in times.items() if name.startswith(("mlx_step", "cpu_step"))}
        best_name = min(ours, key=ours.get)
        best = ours[best_name]
        print(f"  best saepipe step: {best_name}: {best / floor:.2f}x floor (target <= 1.5)")
        for name in ("reference", *_PEERS):
            if isinstance(times.get(name), float):
                print(f"  speed-up vs {name}: {times[name] / best:.2f}x"
                      + ("  (target >= 2)" if name == "sparsify" else ""))


if __name__ == "__main__":
    main()
