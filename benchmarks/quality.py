"""SAE quality per token on real activations: saepipe vs EleutherAI sparsify vs SAELens, same data.

    ./saepipe.sh python benchmarks/quality.py --epochs 1
    ./saepipe.sh python benchmarks/quality.py --epochs 4 --trainers saepipe,sparsify:equal --seeds 0,1
    ./saepipe.sh python benchmarks/quality.py --max-rows 40000 --expansion 4   # a smoke run, minutes

Every trainer reads the same training rows: ``<shards>/train`` (the extract stage's output for one
site, ``data/extract/6.mlp`` or the old single-site ``data/extract``), exported once into a .npy in
``--cache`` (the first ``--max-rows`` rows, or all) that saepipe's ``fit_sae`` and the peers both
train on, with the same width (``--expansion``, default params.yaml's ``sae.expansion_factor``, x
d_model latents), k, batch and token budget (``--epochs`` passes over those rows, every row trained
on: saepipe's ``validation_split`` is set to 0; the last partial batch of an epoch is skipped by
all), and is scored on the same held-out rows (``<shards>/eval``, the first ``--eval-rows``) by the
same numpy code (``saepipe.evaluation.planted.reconstruct``): FVU
(sum |x - x_hat|^2 / sum |x - mean x|^2, original units), dead % (latents that never fire on those
rows) and L0. Then each SAE is spliced into the model by saepipe's evaluator
(``saepipe.evaluation.evaluate.evaluate_sae``, as the ``evaluate`` stage runs it) on the first
``--eval-tokens`` scored tokens of the eval texts (``data/prepare/texts.parquet``) at the site the
shards' manifest records: CE-loss score and KL. Each trainer's weights (W_enc (h, d), b_enc, W_dec (h, d), b_dec; saepipe's with its input
normalization) become a ``TopKSAE`` for that: saepipe's as trained (stats from the ``normalize``
stage), the peers' with no normalization (they train on the raw activations).

Trainers (``--trainers``, comma separated):

- ``saepipe``: ``fit_sae`` with params.yaml's ``sae:`` settings (lr, warmup, schedule, AuxK, init);
  ``saepipe:<variant>`` a one-factor variant from ``benchmarks/planted_gap.py`` (``saepipe:enc_1``:
  encoder = decoder transpose at init, the old recipe);
- ``sparsify``, ``sae_lens``: each library's own defaults for what is not fixed above (sparsify: lr
  2e-4 / sqrt(n_latents / 2^14), 1000 warmup steps, linear decay to 0, no AuxK; SAELens: lr 3e-4
  constant, no warmup, AuxK coefficient 1);
- ``sparsify:equal``, ``sae_lens:equal``: saepipe's peak lr, warmup and schedule (``--schedule``
  overrides: cosine = to 0.1x; SAELens' ``cosineannealing`` to lr/10 is the same curve); sparsify
  also gets saepipe's AuxK coefficient and dead threshold (SAELens keeps its own AuxK).

Peers run ``benchmarks/peer_train.py`` in ``--peer-python`` (install: see ``benchmarks/train.py``);
a peer that cannot be imported there is reported as skipped. Times: wall (the whole training call:
saepipe's ``fit_sae`` with its init; a peer's subprocess with torch's import) and CPU (the
process's, all threads; a peer's from ``getrusage(RUSAGE_CHILDREN)``): CPU time does not depend on
what else runs on the machine the way wall time does. The table ends with each trainer's ratios to
saepipe's first row (FVU, 1 - CE-loss score, KL, wall, CPU: below 1 = better or faster than saepipe).
Results, dated: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the evaluator's progress bars would bury the table

import click
import mlx.core as mx
import numpy as np

import saepipe  # noqa: F401  (fast BLAS before mlx)
from saepipe.activations.config import ExtractConfig
from saepipe.activations.shards import ShardSource
from saepipe.activations.sources import as_source
from saepipe.activations.stats import NormStats
from saepipe.evaluation import planted
from saepipe.evaluation.evaluate import evaluate_sae
from saepipe.lm.model import load_model
from saepipe.lm.sites import Site
from saepipe.runtime.params import model_spec, read_params
from saepipe.sae.config import SAEConfig, SweepConfig, default_learning_rate
from saepipe.sae.topk import TopKSAE
from saepipe.texts.prepare import read_split
from saepipe.training.fit import fit_sae

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planted_gap  # a sibling script: its one-factor variants of fit_sae

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("sparsify", "sae_lens")


def export(source: ShardSource, path: Path, rows: int | None = None, dtype=None) -> Path:
    """The source's first ``rows`` rows (all: None) as a .npy at ``path`` (skipped when present)."""
    if path.exists():
        return path
    n = source.n_rows if rows is None else min(rows, source.n_rows)
    arrays = source.shard_arrays()
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype or arrays[0].dtype, shape=(n, source.d_model))
    start = 0
    for a in arrays:
        take = min(len(a), n - start)
        if take <= 0:
            break
        out[start : start + take] = a[:take]
        start += take
    out.flush()
    del out
    tmp.replace(path)
    return path


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_saepipe(variant: str, a: dict, seed: int) -> tuple[dict, TopKSAE, dict]:
    """``fit_sae`` on the exported rows with params.yaml's settings (or a planted_gap variant of them)."""
    changes, ctxs, kernels = planted_gap._variant_spec(variant) if variant else ({}, [], "auto")
    config = a["sae_config"].replace(num_epochs=a["epochs"], validation_split=0.0, seed=seed, checkpoint_every=0,
                                     use_wandb=False, expansion_factor=a["expansion"])
    if isinstance(changes.get("learning_rate"), str):  # "lr2x": a factor on the peak lr
        changes["learning_rate"] = a["lr"] * float(changes.pop("learning_rate")[:-1])
    config = config.replace(**changes)
    with contextlib.ExitStack() as stack:
        for ctx in ctxs:
            stack.enter_context(ctx())
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = fit_sae(as_source(np.load(a["train_npy"], mmap_mode="r")), config, stats=a["stats"],
                         progress=False, kernels=kernels)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    sae = result.sae
    info = {"lr": sae.metadata["config"]["learning_rate"], "warmup": config.warmup_steps,
            "schedule": f"{config.lr_decay} to {config.min_lr_ratio:g}x" if config.lr_decay != "constant"
            else "constant", "tokens": result.summary["tokens"], "wall": wall, "cpu": cpu,
            "loop": float(result.summary["train_seconds"])}
    return planted_gap.saepipe_weights(sae), sae, info


def train_peer(name: str, settings: str, data: Path, out: Path, a: dict, seed: int,
               d_model: int) -> tuple[dict | None, dict]:
    """``peer_train.py`` in the peer venv; (weights, run info), or (None, {"error": ...}) when it fails."""
    cmd = [a["peer_python"], str(Path(__file__).with_name("peer_train.py")), "--trainer", name, "--data", str(data),
           "--out", str(out), "--n-latents", str(a["expansion"] * d_model), "--k", str(a["k"]),
           "--batch", str(a["batch"]), "--epochs", str(a["epochs"]), "--seed", str(seed)]
    if settings == "equal":
        sched = a["schedule"]
        if name == "sae_lens" and sched == "linear":
            raise click.UsageError("SAELens has no linear decay to 0.1x; use constant or cosine")
        cmd += ["--lr", str(a["lr"]), "--warmup", str(a["warmup"]), "--schedule", sched]
        if name == "sparsify":  # saepipe's AuxK setting, in sparsify's terms
            cmd += ["--auxk-alpha", str(a["sae_config"].aux_coef),
                    "--dead-threshold", str(a["sae_config"].dead_tokens_threshold)]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if proc.returncode != 0:
        return None, {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    if settings == "equal":
        sched = "constant" if a["schedule"] == "constant" else f"{a['schedule']} to 0.1x"
        warm = a["warmup"]
    else:
        sched = {"sparsify": "linear to 0", "sae_lens": "constant"}[name]
        warm = {"sparsify": 1000, "sae_lens": 0}[name]
    info = {"lr": run["lr"], "warmup": warm, "schedule": sched, "tokens": run["tokens"], "wall": wall, "cpu": cpu,
            "loop": run["seconds"]}
    return dict(np.load(out)), info


def as_topk_sae(w: dict, d_model: int, expansion: int, k: int) -> TopKSAE:
    """A peer's raw-activation weights as a saepipe ``TopKSAE`` (no input normalization)."""
    sae = TopKSAE(d_model, expansion, k)
    sae.update({n: mx.array(np.asarray(w[n], np.float32)) for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
    return sae


def score(w: dict, x: np.ndarray, k: int) -> dict:
    """FVU (original units), dead fraction and L0 of weights ``w`` on the held-out rows ``x``."""
    xh, fired = planted.reconstruct(w, x, k)
    x64 = x.astype(np.float64)
    fvu = float(np.square(x64 - xh).sum() / np.square(x64 - x64.mean(axis=0)).sum())
    v, _ = planted.encode(w, x[:4096], k)
    return {"fvu": fvu, "dead": float((fired == 0).mean()), "l0": float((v > 0).sum(axis=1).mean())}


def splice(sae: TopKSAE, a: dict) -> dict:
    """CE-loss score and KL of ``sae`` spliced into the model (saepipe's evaluator)."""
    ext: ExtractConfig = a["extract"]
    site: Site = a["site"]
    r = evaluate_sae(a["model"], sae, a["texts"], layer=site.layer, component=site.component,
                     max_tokens=a["eval_tokens"], batch_size=8, context_length=ext.context_length,
                     skip_special_tokens=ext.skip_special_tokens)
    return {"ce_loss_score": r.spliced.ce_loss_score, "kl": r.spliced.kl_spliced, "ce_clean": r.spliced.ce_clean,
            "ce_spliced": r.spliced.ce_spliced, "splice_fvu": r.reconstruction.fvu, "splice_tokens": r.sparsity.n_tokens}


def default_shards() -> Path:
    """The first sweep site's extract output (``data/extract/<site>``), or the old ``data/extract``."""
    params = read_params(ROOT / "params.yaml") if (ROOT / "params.yaml").exists() else {}
    site = SweepConfig.from_dict(params.get("sweep") or {}).sites[0]
    per_site = ROOT / "data" / "extract" / site
    return per_site if (per_site / "train").is_dir() else ROOT / "data" / "extract"


def default_stats(shards: Path, site: Site) -> Path:
    """The normalize stage's stats for ``site`` (``data/normalize/<site>/``, or the old single-site path)."""
    root = shards.resolve().parents[1] if shards.name == site.id else shards.resolve().parent
    per_site = root / "normalize" / site.id / "stats.safetensors"
    return per_site if per_site.exists() else root / "normalize" / "stats.safetensors"


def shard_site(source: ShardSource) -> Site:
    """The site (layer, component) the shards' manifest records."""
    return Site(int(source.manifest["layer"]), str(source.manifest["component"]))


def data_tag(source: ShardSource) -> str:
    """A short hash of the shards' identity (their manifest's digest), to name the exported .npy files."""
    key = source.manifest.get("digest") or json.dumps(source.manifest, sort_keys=True, default=str)
    return hashlib.sha256(str(key).encode()).hexdigest()[:12]


def summarize(name: str, runs: list[dict]) -> dict:
    """Means over seeds of one trainer's runs (and the FVU's seed spread)."""
    fv = np.array([r["fvu"] for r in runs])
    row = {key: float(np.mean([r[key] for r in runs])) if key in runs[0] else float("nan")
           for key in ("fvu", "dead", "l0", "ce_loss_score", "kl", "wall", "cpu")}
    return {**runs[0], **row, "name": name, "spread": float(fv.std(ddof=1)) if len(fv) > 1 else None}


def table(rows: list[dict]) -> list[str]:
    """The three-way table: one line per trainer, then its ratios to the first saepipe row."""
    head = (f"{'trainer':<18} {'lr':>8} {'warm':>5} {'schedule':>14} {'tokens':>9} {'FVU':>15} {'dead %':>7} "
            f"{'L0':>5} {'CE score':>8} {'KL':>7} {'wall s':>7} {'CPU s':>7}")
    lines = [head]
    for r in rows:
        spread = f"±{r['spread']:.4f}" if r["spread"] is not None else ""
        lines.append(f"{r['name']:<18} {r['lr']:8.2e} {r['warmup']:5d} {r['schedule']:>14} {r['tokens']:9d} "
                     f"{r['fvu']:>8.4f}{spread:<7} {100 * r['dead']:7.2f} {r['l0']:5.1f} "
                     f"{r['ce_loss_score']:8.4f} {r['kl']:7.4f} {r['wall']:7.0f} {r['cpu']:7.0f}")
    base = next((r for r in rows if r["name"].startswith("saepipe")), None)
    if base is not None:
        lines += ["", f"ratios to {base['name']} (< 1: lower error / faster than it)",
                  f"{'trainer':<18} {'FVU':>7} {'1-CE score':>10} {'KL':>7} {'wall':>7} {'CPU':>7}"]
        for r in rows:
            lines.append(f"{r['name']:<18} {_ratio(r['fvu'], base['fvu']):>7} "
                         f"{_ratio(1 - r['ce_loss_score'], 1 - base['ce_loss_score']):>10} "
                         f"{_ratio(r['kl'], base['kl']):>7} {_ratio(r['wall'], base['wall']):>7} "
                         f"{_ratio(r['cpu'], base['cpu']):>7}")
    return lines


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base and np.isfinite(value) and np.isfinite(base) else "-"


def run_trainer(name: str, a: dict, seed: int, held: np.ndarray) -> dict | None:
    """Train ``name`` (``trainer[:option]``) once and score it; None when a peer is unavailable."""
    trainer, _, option = name.partition(":")
    path = a["out"] / f"{name.replace(':', '-')}_{a['tag']}_e{a['epochs']}_s{seed}.npz"
    if trainer == "saepipe":
        w, sae, info = train_saepipe(option, a, seed)
        np.savez(path, **w)
    elif trainer in PEERS:
        w, info = train_peer(trainer, option or "default", a["train_npy"], path, a, seed, a["d_model"])
        if w is None:
            print(f"{name:<18} skipped: {info['error']}", flush=True)
            return None
        sae = as_topk_sae(w, a["d_model"], a["expansion"], a["k"])
    else:
        raise click.UsageError(f"unknown trainer {name!r}")
    r = {**score(w, held, a["k"]), **info, **(splice(sae, a) if a["eval_tokens"] else {})}
    r["weights"] = str(path)
    return r


@click.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a folder with train/ and eval/ shard folders (default: data/extract/<first sweep site>, "
                   "else data/extract)")
@click.option("--stats", "stats_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="saepipe's input normalization (default: the normalize stage's output for the shards' site)")
@click.option("--texts", "texts_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=ROOT / "data" / "prepare" / "texts.parquet", show_default=True,
              help="prepare's texts: the eval split is spliced over")
@click.option("--params", "params_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=ROOT / "params.yaml", show_default=True)
@click.option("--trainers", default="saepipe,sparsify,sae_lens", show_default=True)
@click.option("--epochs", default=1, show_default=True)
@click.option("--max-rows", type=int, default=None, help="train on the first this many rows only (default: all)")
@click.option("--expansion", type=int, default=None, help="latents / d_model (default: params.yaml's)")
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine"]), default=None,
              help="for the :equal peers (default: params.yaml's lr_decay)")
@click.option("--seeds", default="0", show_default=True)
@click.option("--eval-rows", default=20_000, show_default=True, help="held-out shard rows scored")
@click.option("--eval-tokens", default=2000, show_default=True, help="eval-text tokens spliced (0: skip)")
@click.option("--peer-python", default="/work/peers/venv/bin/python", show_default=True)
@click.option("--cache", type=click.Path(path_type=Path), default=Path("/tmp/saepipe_quality"), show_default=True)
@click.option("--json-out", default=None, help="append one JSON line per run here")
def main(shards, stats_path, texts_path, params_path, trainers, epochs, max_rows, expansion, schedule, seeds,
         eval_rows, eval_tokens, peer_python, cache, json_out):
    shards = shards or default_shards()
    params = read_params(params_path)
    sae_config = SAEConfig.from_dict(params["sae"])
    train_src, eval_src = ShardSource(shards / "train"), ShardSource(shards / "eval")
    site, d, tag = shard_site(train_src), train_src.d_model, data_tag(train_src)
    expansion = expansion or sae_config.expansion_factor
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "weights").mkdir(parents=True, exist_ok=True)
    rows_tag = f"{tag}_{max_rows}" if max_rows else tag
    train_npy = export(train_src, cache / f"train_{rows_tag}.npy", max_rows)
    held = np.load(export(eval_src, cache / f"eval_{tag}_{eval_rows}.npy", eval_rows, np.float32))
    stats_path = stats_path or default_stats(shards, site)
    lr = sae_config.learning_rate or default_learning_rate(d * expansion)
    a = dict(stats=NormStats.load(stats_path) if sae_config.normalize_input else None, train_npy=train_npy,
             sae_config=sae_config, extract=ExtractConfig.from_dict(params.get("extract") or {}), site=site,
             expansion=expansion, k=sae_config.k, batch=sae_config.batch_size, epochs=epochs, lr=lr,
             warmup=sae_config.warmup_steps, schedule=schedule or sae_config.lr_decay, peer_python=peer_python,
             eval_tokens=eval_tokens, out=cache / "weights", tag=rows_tag, d_model=d)
    if eval_tokens:
        a["model"] = load_model(model_spec(params))
        a["texts"] = read_split(texts_path, "eval")[1]
    n_train = len(np.load(train_npy, mmap_mode="r"))
    print(f"# site {site.id}: {n_train} train rows x {epochs} epochs (d_model {d}), {eval_src.n_rows} eval rows "
          f"(first {len(held)} scored), {eval_tokens} eval-text tokens spliced; {expansion * d} latents, "
          f"k={a['k']}, batch {a['batch']}; saepipe stats {stats_path}", flush=True)
    rows = []
    for name in trainers.split(","):
        runs = []
        for seed in [int(s) for s in seeds.split(",")]:
            r = run_trainer(name, a, seed, held)
            if r is None:
                break
            runs.append(r)
            print(f"{name} seed {seed}: FVU {r['fvu']:.4f}, dead {100 * r['dead']:.2f} %, "
                  f"CE score {r.get('ce_loss_score', float('nan')):.4f}, wall {r['wall']:.0f} s", flush=True)
            if json_out:
                with open(json_out, "a") as f:
                    f.write(json.dumps({"trainer": name, "seed": seed, "epochs": epochs, "rows": n_train, **r})
                            + "\n")
        if runs:
            rows.append(summarize(name, runs))
    print("\n" + "\n".join(table(rows)))


if __name__ == "__main__":
    sys.exit(main())
