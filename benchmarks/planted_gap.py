"""Planted-dictionary recovery: saepipe ``fit_sae`` (and variants of it) vs the PyTorch peers.

    ./saepipe.sh python benchmarks/planted_gap.py --variants base,sparsify --seeds 0,1,2
    ./saepipe.sh python benchmarks/planted_gap.py --preset issue --variants base,clip0,enc_1,...

Data: ``saepipe.planted.PlantedDictionary`` (random unit atoms, Zipf frequencies, exactly ``s``
active atoms per row with log-normal magnitudes, a constant offset, small noise); the training rows
are written once to a .npy (``--cache``) that the peers read; scores on fresh held-out rows of the
same dictionary: MMCS (mean best cosine of each atom with a decoder row), the fraction of atoms
recovered at cosine >= 0.9, held-out FVU; mean ± std over ``--seeds`` (the seed is the SAE's
init/batch-order seed; the data is the same for all).

Variants (``--variants``, comma separated): ``base`` = ``fit_sae`` with the settings below; each
other saepipe variant changes one thing (see ``VARIANTS``) by a config field or by patching one
function for the run; ``sparsify`` / ``sae_lens`` run ``benchmarks/peer_train.py`` in
``--peer-python``. ``enc_<f>``: the encoder starts at f x decoder^T; ``enc_<f>x``: at f x the
fitted least-squares scale (the default init). ``--schedule`` (constant, linear, cosine) applies to all; ``default`` gives each
library its own (saepipe: cosine to 0.1x; sparsify: linear to 0; SAELens: constant).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

import saepipe  # noqa: F401  (fast BLAS before mlx)
from saepipe.evaluation import planted
from saepipe.sae.config import SAEConfig
from saepipe.sae.normalization import InputNormalizer
from saepipe.training import cpu_step, reference, state
from saepipe.training.fit import fit_sae

PRESETS = {
    # the set: d=96, 4x atoms, 6 active, 300k rows, 3 epochs
    "issue": dict(d=96, n_atoms=384, s=6, rows=300_000, epochs=3, zipf=1.0),
    # a second shape: wider, denser
    "wide": dict(d=64, n_atoms=512, s=8, rows=200_000, epochs=3, zipf=0.7),
    # small: for quick looks
    "small": dict(d=32, n_atoms=128, s=4, rows=60_000, epochs=2, zipf=1.0),
    # the CI tests' set (tests/test_planted.py)
    "ci": dict(d=32, n_atoms=64, s=3, rows=32_768, epochs=4, zipf=0.5),
}


def saepipe_weights(sae) -> dict:
    """A saepipe TopKSAE as plain arrays (``saepipe.evaluation.planted``'s format)."""
    w = {"W_enc": np.array(sae.W_encoder), "b_enc": np.array(sae.b_enc), "W_dec": np.array(sae.W_dec),
         "b_dec": np.array(sae.b_dec)}
    if sae.stats is not None:
        norm = InputNormalizer(sae.stats, sae.normalization)
        w["mean"], w["scale"] = np.array(norm.mean), np.array(norm.std)
    return w


# --------------------------------------------------------------------------------------------------
# one-factor variants of saepipe's recipe
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _bdec(kind):
    def init(x, *a, **kw):
        return x.astype(np.float64).mean(axis=0) if kind == "mean" else np.zeros(x.shape[1])

    return _patched(state, "geometric_median", init)


def _enc_factor(factor):
    """The encoder starts at ``factor`` x the fitted least-squares scale."""
    real = state.fitted_encoder_scale

    def scaled(xc, W_dec, k):
        return factor * real(xc, W_dec, k)

    return _patched(state, "fitted_encoder_scale", scaled)


def _adam(betas=None, eps=None):
    """Adam's constants in the CPU step (the kernels ``auto`` picks on a CPU)."""
    stack = contextlib.ExitStack()
    if betas is not None:
        stack.enter_context(_patched(cpu_step, "ADAM_BETAS", betas))
    if eps is not None:
        stack.enter_context(_patched(cpu_step, "ADAM_EPS", eps))
    return stack


def _aux_total_var():
    """AuxK divided by the batch's total variance (sparsify) instead of the residual's."""
    real = cpu_step.CpuStep._auxk

    def auxk(self, dead, a, xc, e, e_var, W_dec, aux_scale):
        xc64 = xc.astype(np.float64)
        total = float(np.square(xc64 - xc64.mean(axis=0)).sum())
        return real(self, dead, a, xc, e, total, W_dec, aux_scale)

    return _patched(cpu_step.CpuStep, "_auxk", auxk)


def _no_projection():
    """Reference kernels with the decoder-gradient projection removed (the renorm stays)."""
    import mlx.core as mx  # only this variant computes in MLX here

    def adam(params, grads, m, v, t, lr, clip):  # state.constrained_adam without the projection
        gnorm = mx.sqrt(sum(mx.square(gi).sum() for gi in grads.values()))
        if clip > 0:
            scale = mx.minimum(1.0, clip / (gnorm + state.GRAD_NORM_EPS))
            grads = {n: gi * scale for n, gi in grads.items()}
        t = t + 1
        b1, b2 = state.ADAM_BETAS
        c1, c2 = 1 - b1**t, 1 - b2**t
        new_p, new_m, new_v = {}, {}, {}
        for n, p in params.items():
            g = grads[n]
            new_m[n] = b1 * m[n] + (1 - b1) * g
            new_v[n] = b2 * v[n] + (1 - b2) * mx.square(g)
            p = p - lr * (new_m[n] / c1) / (mx.sqrt(new_v[n] / c2) + state.ADAM_EPS)
            if n == "W_dec":
                p = p / mx.maximum(mx.linalg.norm(p, axis=1, keepdims=True), state.ROW_NORM_FLOOR)
            new_p[n] = p
        return new_p, new_m, new_v, t, gnorm

    return _patched(reference, "constrained_adam", adam)


VARIANTS = {
    # name: (config changes, context factory or None, kernels)
    "base": ({}, None, "auto"),
    "reference": ({}, None, "reference"),
    "clip0": ({"gradient_clip": 0.0}, None, "auto"),
    "warmup0": ({"warmup_steps": 0}, None, "auto"),
    "warmup1000": ({"warmup_steps": 1000}, None, "auto"),
    "nonorm": ({"normalize_input": False}, None, "auto"),
    "perdim": ({"normalization": "per_dim"}, None, "auto"),
    "aux0": ({"aux_coef": 0.0}, None, "auto"),
    "bdec_mean": ({}, lambda: _bdec("mean"), "auto"),
    "bdec_zero": ({}, lambda: _bdec("zeros"), "auto"),
    "enc_1": ({"encoder_init_scale": 1.0}, None, "auto"),  # encoder = decoder^T (before: the default)
    "eps1e-6": ({}, lambda: _adam(eps=1e-6), "auto"),
    "beta2_0.99": ({}, lambda: _adam(betas=(0.9, 0.99)), "auto"),
    "aux_totalvar": ({}, _aux_total_var, "auto"),
    "noproj": ({}, _no_projection, "reference"),
}
PEERS = ("sparsify", "sae_lens")


def _lookup(part):
    if part in VARIANTS:
        return VARIANTS[part]
    if part.startswith("enc_") and part.endswith("x"):  # encoder = f x the fitted scale at init
        factor = float(part[4:-1])
        return {}, lambda: _enc_factor(factor), "auto"
    if part.startswith("enc_"):  # encoder = f x decoder^T at init
        return {"encoder_init_scale": float(part[4:])}, None, "auto"
    if part.startswith("lr") and part.endswith("x"):
        return {"learning_rate": part[2:]}, None, "auto"
    raise KeyError(part)


def _variant_spec(name):
    """A name from VARIANTS, or ``a+b`` (several at once), or ``cfg:key=value[,..]`` ad hoc."""
    if name.startswith("cfg:"):
        changes = {}
        for item in name[4:].split(";"):
            key, val = item.split("=")
            changes[key] = json.loads(val) if val not in ("true", "false") else val == "true"
        return changes, [], "auto"
    changes, ctxs, kernels = {}, [], "auto"
    for part in name.split("+"):
        c, ctx, kern = _lookup(part)
        changes |= c
        if ctx is not None:
            ctxs.append(ctx)
        if kern != "auto":
            kernels = kern
    return changes, ctxs, kernels


def run_saepipe(name, x, dictionary, held, s, n_latents, args, seed):
    changes, ctxs, kernels = _variant_spec(name)
    schedule = "cosine" if args["schedule"] == "default" else args["schedule"]
    lr = args["lr"]
    if isinstance(changes.get("learning_rate"), str):
        lr *= float(changes.pop("learning_rate")[:-1])
    d = x.shape[1]
    cfg = dict(expansion_factor=n_latents // d, k=s, learning_rate=lr, num_epochs=args["epochs"],
               batch_size=args["batch"], warmup_steps=args["warmup"], validation_split=0.0,
               lr_decay=schedule, seed=seed, checkpoint_every=0,
               dead_tokens_threshold=args["dead_threshold"], aux_coef=args["aux_coef"])
    cfg |= changes
    with contextlib.ExitStack() as stack:
        for ctx in ctxs:
            stack.enter_context(ctx())
        t0 = time.perf_counter()
        result = fit_sae(x, SAEConfig(**cfg), progress=False, kernels=kernels)
        seconds = time.perf_counter() - t0
    score = _score(saepipe_weights(result.sae), dictionary, held, s, seconds)
    score["grad_norm"] = [h["train/grad_norm"] for h in result.history]  # epoch means
    return score


def run_peer(name, data_path, dictionary, held, s, n_latents, args, seed):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "w.npz"
        sched = args["schedule"]
        if sched == "default":
            sched = "linear" if name == "sparsify" else "constant"
        if name == "sae_lens" and sched == "linear":
            sched = "cosine"  # SAELens has no linear-to-0 main schedule
        cmd = [args["peer_python"], str(Path(__file__).with_name("peer_train.py")), "--trainer", name,
               "--data", str(data_path), "--out", str(out), "--n-latents", str(n_latents), "--k", str(s),
               "--batch", str(args["batch"]), "--epochs", str(args["epochs"]), "--lr", str(args["lr"]),
               "--warmup", str(args["warmup"]), "--schedule", sched, "--seed", str(seed),
               "--threads", "2"]
        if name == "sparsify":
            cmd += ["--auxk-alpha", str(args["peer_auxk_alpha"]), "--dead-threshold", str(args["dead_threshold"])]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed: {proc.stderr[-2000:]}")
        w = dict(np.load(out))
    return _score(w, dictionary, held, s, seconds)


def _score(w, dictionary, held, s, seconds):
    return {"mmcs": planted.mmcs(dictionary.atoms, w["W_dec"]),
            "rec90": planted.recovered(dictionary.atoms, w["W_dec"], 0.9),
            "fvu": planted.fvu(w, held, s), "seconds": seconds}


@click.command()
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="issue", show_default=True)
@click.option("--width", type=float, default=1.0, show_default=True, help="n_latents / n_atoms")
@click.option("--epochs", type=int, default=None, help="default: the preset's")
@click.option("--rows", type=int, default=None, help="training rows (default: the preset's)")
@click.option("--batch", default=1024, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--warmup", default=100, show_default=True)
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine", "default"]), default="constant",
              show_default=True)
@click.option("--dead-threshold", default=10_000_000, show_default=True,
              help="tokens (saepipe and sparsify); the default keeps AuxK off in these short runs")
@click.option("--aux-coef", default=1 / 32, show_default=True)
@click.option("--peer-auxk-alpha", default=0.0, show_default=True)
@click.option("--variants", default="base,sparsify", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--data-seed", default=0, show_default=True)
@click.option("--peer-python", default="/work/peers/venv/bin/python", show_default=True)
@click.option("--cache", default="/tmp/planted_cache", show_default=True)
@click.option("--json-out", default=None, help="append one JSON line per (variant, seed) here")
def main(preset, width, epochs, rows, batch, lr, warmup, schedule, dead_threshold, aux_coef, peer_auxk_alpha,
         variants, seeds, data_seed, peer_python, cache, json_out):
    p = dict(PRESETS[preset])
    if epochs is not None:
        p["epochs"] = epochs
    if rows is not None:
        p["rows"] = rows
    dictionary = planted.PlantedDictionary.create(p["d"], p["n_atoms"], p["s"], zipf=p["zipf"], seed=data_seed)
    cache_dir = Path(cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    data_path = cache_dir / f"{preset}_{p['rows']}_{data_seed}.npy"
    if not data_path.exists():
        np.save(data_path, dictionary.sample(p["rows"], seed=1000 + data_seed))
    x = np.load(data_path)
    held = dictionary.sample(20_000, seed=2000 + data_seed)
    n_latents = round(width * p["n_atoms"])
    args = dict(epochs=p["epochs"], batch=batch, lr=lr, warmup=warmup, schedule=schedule,
                dead_threshold=dead_threshold, aux_coef=aux_coef, peer_auxk_alpha=peer_auxk_alpha,
                peer_python=peer_python)
    print(f"# {preset}: d={p['d']} atoms={p['n_atoms']} s={p['s']} rows={p['rows']} x{p['epochs']} epochs, "
          f"n_latents={n_latents}, batch {batch}, lr {lr}, warmup {warmup}, schedule {schedule}, "
          f"dead threshold {dead_threshold}", flush=True)
    seed_list = [int(s) for s in seeds.split(",")]
    print(f"{'variant':<28} {'MMCS':>15} {'rec@0.9':>15} {'FVU':>15} {'sec':>6}", flush=True)
    for name in variants.split(","):
        rows_ = []
        for seed in seed_list:
            if name in PEERS:
                r = run_peer(name, data_path, dictionary, held, p["s"], n_latents, args, seed)
            else:
                r = run_saepipe(name, x, dictionary, held, p["s"], n_latents, args, seed)
            rows_.append(r)
            if json_out:
                with open(json_out, "a") as f:
                    f.write(json.dumps({"preset": preset, "width": width, **args, "epochs": p["epochs"],
                                        "rows": p["rows"], "variant": name, "seed": seed, **r,
                                        "peer_python": None}) + "\n")

        def ms(key, rows_=rows_):
            v = np.array([r[key] for r in rows_])
            return f"{v.mean():.4f}±{v.std(ddof=1) if len(v) > 1 else 0:.4f}"

        print(f"{name:<28} {ms('mmcs'):>15} {ms('rec90'):>15} {ms('fvu'):>15} "
              f"{np.mean([r['seconds'] for r in rows_]):6.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
