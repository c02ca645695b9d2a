"""The default run's SAE, one change at a time: ``fit_sae`` on the pipeline's shards, scored held out.

    ./saepipe.sh python benchmarks/retune.py --variant base --variant "lr6e-3=learning_rate:0.006" \
        --epochs 4 --seeds 0,1 --json-out /tmp/retune.jsonl

Each run trains exactly as the ``train`` stage does: ``params.yaml``'s ``sae:`` section (its
``validation_split`` too) on ``<shards>/train`` with the ``normalize`` stage's stats, then scores
the SAE on every row of ``<shards>/eval`` (held-out texts): FVU (sum |x - x_hat|^2 / sum |x - mean
x|^2, original units), the share of latents that never fire on those rows ("eval dead"), and the
training run's own dead fraction (no fire for ``dead_tokens_threshold`` tokens, at the end).

``--variant NAME=CHANGES``: ``CHANGES`` is ``key:value`` pairs separated by ``,``; a key is an
``SAEConfig`` field (``learning_rate:0.006``, ``aux_coef:0.125``), or ``enc_factor:F`` (the
encoder starts at F x the default scale, itself 0.85 x the least-squares one:
``training.state.fitted_encoder_scale`` is wrapped for the run), or ``beta2:B`` (Adam's second-moment decay, patched into the CPU step; only
the CPU kernels are patched, so the run uses them). ``base`` alone: params.yaml as it is.

Prints one line per run and a mean per variant; CPU time is the process's (all threads), which does
not depend on what else runs on the machine the way wall time does.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

import saepipe  # noqa: F401  (fast BLAS before mlx)
from saepipe.activations.shards import ShardSource
from saepipe.activations.stats import NormStats
from saepipe.runtime.params import read_params
from saepipe.sae.config import SAEConfig
from saepipe.sae.topk import TopKSAE
from saepipe.training import cpu_step, state
from saepipe.training.fit import fit_sae

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # a sibling script: where the shards and stats are

ROOT = Path(__file__).resolve().parents[1]


def parse_variant(spec: str) -> tuple[str, dict]:
    """``NAME=key:value,...`` (or ``base``) -> (name, changes); values parsed as YAML scalars."""
    import yaml  # only here: the rest of the script does not parse YAML

    name, _, body = spec.partition("=")
    changes = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition(":")
        changes[key.strip()] = yaml.safe_load(value)
    return name, changes


@contextlib.contextmanager
def patched(changes: dict, record: dict):
    """Apply the non-config changes (``enc_factor``, ``beta2``) for the duration of one run; the
    encoder's initial scale, when fitted, goes to ``record["enc_init"]``."""
    factor = float(changes.get("enc_factor", 1.0))
    beta2 = changes.get("beta2")
    real_scale, real_betas = state.fitted_encoder_scale, cpu_step.ADAM_BETAS

    def scaled(xc, W_dec, k):
        record["enc_fitted"] = real_scale(xc, W_dec, k)
        record["enc_init"] = factor * record["enc_fitted"]
        return record["enc_init"]

    state.fitted_encoder_scale = scaled
    if beta2 is not None:
        cpu_step.ADAM_BETAS = (real_betas[0], float(beta2))
    try:
        yield
    finally:
        state.fitted_encoder_scale, cpu_step.ADAM_BETAS = real_scale, real_betas


def score(sae: TopKSAE, x: np.ndarray, chunk: int = 4096) -> dict:
    """Held-out FVU (float64 sums, original units) and the share of latents never firing on ``x``."""
    x64 = x.astype(np.float64)
    err = 0.0
    fired = np.zeros(sae.d_hidden, bool)
    for start in range(0, len(x), chunk):
        xb = mx.array(x[start : start + chunk])
        values, indices = sae.encode_topk(xb)
        xh = np.asarray(sae.decode_topk(values, indices), dtype=np.float64)
        err += float(np.square(x64[start : start + chunk] - xh).sum())
        idx, val = np.asarray(indices), np.asarray(values)
        fired[idx[val > 0]] = True
    total = float(np.square(x64 - x64.mean(axis=0)).sum())
    return {"fvu": err / total, "eval_dead": float(1.0 - fired.mean())}


@click.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a folder with train/ and eval/ (default: data/extract/<first sweep site>, else data/extract)")
@click.option("--stats", "stats_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="default: the normalize stage's stats for the shards' site")
@click.option("--params", "params_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=ROOT / "params.yaml", show_default=True)
@click.option("--variant", "variants", multiple=True, default=("base",), show_default=True)
@click.option("--epochs", type=int, default=None, help="default: params.yaml's num_epochs")
@click.option("--seeds", default="0", show_default=True)
@click.option("--json-out", default=None, help="append one JSON line per run here")
def main(shards, stats_path, params_path, variants, epochs, seeds, json_out):
    sae_params = read_params(params_path)["sae"]
    shards = shards or quality.default_shards()
    train, held = ShardSource(shards / "train"), ShardSource(shards / "eval")
    stats_path = stats_path or quality.default_stats(shards, quality.shard_site(train))
    x_eval = held.take(np.arange(held.n_rows)).astype(np.float32)
    stats = NormStats.load(stats_path)
    print(f"# {train.n_rows} train rows, {held.n_rows} eval rows; params {params_path}", flush=True)
    print(f"{'variant':<28} {'seed':>4} {'ep':>2} {'lr':>8} {'enc a':>6} {'FVU':>8} {'eval dead %':>11} "
          f"{'train dead %':>12} {'cpu s':>7} {'wall s':>7}", flush=True)
    for spec in variants:
        name, changes = parse_variant(spec)
        fields = {k: v for k, v in changes.items() if k not in ("enc_factor", "beta2")}
        rows = []
        for seed in [int(s) for s in seeds.split(",")]:
            config = SAEConfig.from_dict({**sae_params, "use_wandb": False, "checkpoint_every": 0, "seed": seed,
                                          **({"num_epochs": epochs} if epochs else {}), **fields})
            kernels = "cpu" if "beta2" in changes else "auto"
            init = {"enc_init": config.encoder_init_scale}
            with patched(changes, init):
                cpu0, wall0 = time.process_time(), time.perf_counter()
                result = fit_sae(train, config, stats=stats, progress=False, kernels=kernels)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            sae = result.sae
            a = init["enc_init"] if init["enc_init"] is not None else float("nan")
            r = {"variant": name, "changes": changes, "seed": seed, "epochs": config.num_epochs,
                 "learning_rate": sae.metadata["config"]["learning_rate"], **init,
                 **score(sae, x_eval), "train_dead": result.summary["dead_fraction"],
                 "val_fvu": result.summary.get("val/fvu"), "cpu_s": cpu, "wall_s": wall,
                 "train_seconds": result.summary["train_seconds"]}
            rows.append(r)
            print(f"{name:<28} {seed:>4} {config.num_epochs:>2} {r['learning_rate']:8.2e} {a:6.3f} {r['fvu']:8.4f} "
                  f"{100 * r['eval_dead']:11.2f} {100 * r['train_dead']:12.2f} {cpu:7.0f} {wall:7.0f}", flush=True)
            if json_out:
                with open(json_out, "a") as f:
                    f.write(json.dumps(r) + "\n")
        if len(rows) > 1:
            fv = np.array([r["fvu"] for r in rows])
            print(f"{name + ' (mean)':<28} {'':>4} {'':>2} {'':>8} {'':>6} {fv.mean():8.4f} "
                  f"{100 * np.mean([r['eval_dead'] for r in rows]):11.2f} "
                  f"{100 * np.mean([r['train_dead'] for r in rows]):12.2f}   ± {fv.std(ddof=1):.4f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
