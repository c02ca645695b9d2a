"""Stage `train`: fit a TopK SAE on the extracted train activations of one site.

    uv run python -m stages.train --params params.yaml --site 6.mlp --variant default \
        --acts data/extract/6.mlp/train --stats data/normalize/6.mlp/stats.safetensors \
        --out data/train/6.mlp/default

Reads ``sae:`` (SAEConfig) with the overrides of ``sweep.variants.<variant>`` on top (without
``--variant``: ``sae:`` as is) and ``model``; the site is the shards' (``--site`` must match it). Writes
``<out>/sae.safetensors`` (the SAE file: weights and what they were trained on, no timings, so
identical runs write identical files), ``<out>/metrics.json`` (final summary with timings, per-epoch
history), ``<out>/headline.json`` (the final training loss, for ``dvc exp show``) and the dvclive
folder ``<out>/live``. Checkpoints go to ``--checkpoints`` (default ``<out>/checkpoints``); a matching
checkpoint is resumed (weights and the dvclive curves up to its step), and it is removed once the
SAE is saved. The shards and stats are checked against their manifest and params before training.

Data-parallel on several processes or machines: start it with ``mlx.launch`` (README, "Several
machines"), e.g. ``mlx.launch -n 2 --backend ring -- python -m stages.train ...``; every rank
reads its part of each batch, rank 0 alone writes the outputs and checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from saepipe.activations.sources import as_source
from saepipe.activations.stats import NormStats
from saepipe.lm.sites import parse_site_id
from saepipe.parallel.ranks import Ranks
from saepipe.runtime.files import write_metrics_json
from saepipe.runtime.params import model_spec, read_params, section
from saepipe.sae.config import SAEConfig, variant_config
from saepipe.training.checkpoint import CHECKPOINT_NAME
from saepipe.training.fit import fit_sae
from stages import stage_run

SAE_FILE = "sae.safetensors"
METRICS_FILE = "metrics.json"
HEADLINE_FILE = "headline.json"


def run_metadata(source: Any, params: dict[str, Any], site: str | None = None) -> dict[str, Any]:
    """SAE metadata: the site of the shards' manifest, which must be ``site`` when given (fit_sae adds
    the manifest's model identity and digest itself). Rows without a manifest need ``site``."""
    manifest = getattr(source, "manifest", None) or {}
    if not manifest:
        if site is None:
            raise ValueError("these activations have no manifest naming their site: pass --site layer.component")
        layer, component = parse_site_id(site)
        return {"layer": layer, "component": component, "model_name": model_spec(params)}
    have = (manifest.get("layer"), manifest.get("component"))
    if site is not None and parse_site_id(site) != have:
        raise ValueError(f"activations were extracted at {have[0]}.{have[1]} but --site is {site}: "
                         f"pass that site's shards (data/extract/{site}/train) or rerun extract")
    if manifest.get("split") not in (None, "train"):
        raise ValueError(f"{source.folder} holds the {manifest['split']!r} split; train reads the train split")
    # the manifest's model_id names the weights actually read
    return {"layer": int(have[0]), "component": str(have[1])}


def load_stats(path: Path | None, source: Any) -> NormStats | None:
    """Stats from ``path`` (None: fit during training); stale stats for other shards are an error."""
    if path is None:
        return None
    stats = NormStats.load(path)  # checks the file against its sidecar's digest
    sidecar = json.loads(path.with_suffix(".json").read_text())
    manifest = getattr(source, "manifest", None) or {}
    want, have = manifest.get("digest"), sidecar.get("manifest_digest")
    if want and have and want != have:
        raise ValueError(f"{path} was fit on other activations (manifest {have}, these are {want}): rerun normalize")
    return stats


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The few training figures ``dvc exp show`` lists (named apart from evaluate's metrics)."""
    return {"train_final_loss": summary.get("final_loss"), "train_val_fvu": summary.get("val/fvu")}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with `sae:`, `extract:`, `model:`")
@click.option("--site", default=None, help="the site of --acts (layer.component, e.g. 6.mlp), checked against its manifest")
@click.option("--variant", default=None, help="a name of params.yaml's sweep.variants (its sae: overrides apply)")
@click.option("--acts", "acts_dir", default="data/extract/6.mlp/train", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="train shard folder")
@click.option("--stats", "stats_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="normalization stats (.safetensors from normalize); fit on the train rows when omitted")
@click.option("--out", "out_dir", default="data/train/6.mlp/default", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder")
@click.option("--checkpoints", "ckpt_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="checkpoint folder (default <out>/checkpoints)")
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="steps between logged training metrics")
def main(params_path: Path, site: str | None, variant: str | None, acts_dir: Path, stats_path: Path | None,
         out_dir: Path, ckpt_dir: Path | None, log_every: int) -> None:
    """Train a TopK SAE and write it with its metrics."""
    ckpt_dir = ckpt_dir or out_dir / "checkpoints"
    with stage_run("train", out_dir):
        params = read_params(params_path)
        sae = section(params, "sae")
        if variant is None:
            config = SAEConfig.from_dict(sae)
        else:
            config = variant_config(sae, section(params, "sweep").get("variants"), variant)
        source = as_source(acts_dir)
        metadata = run_metadata(source, params, site)
        stats = load_stats(stats_path, source) if config.normalize_input else None
        ranks = Ranks.world()
        if ranks.distributed:
            click.echo(f"rank {ranks.rank} of {ranks.size}", err=True)
        if ranks.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        result = fit_sae(source, config, stats=stats, metadata=metadata, checkpoint_dir=ckpt_dir,
                         live_dir=out_dir / "live", log_every=log_every, ranks=ranks)
        if not ranks.is_main:
            return
        sae_path = result.sae.save(out_dir / SAE_FILE)
        write_metrics_json(out_dir / METRICS_FILE, {**result.summary, "history": result.history})
        write_metrics_json(out_dir / HEADLINE_FILE, headline(result.summary))
        (ckpt_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
            ckpt_dir.rmdir()
    s = result.summary
    click.echo(f"{sae_path}: d_hidden {result.sae.d_hidden}, k {config.k}; {s['steps']} steps, "
               f"val FVU {s.get('val/fvu', float('nan')):.4f}, L0 {s.get('val/l0', float('nan')):.1f}, "
               f"dead {s['dead_fraction']:.3f}, {s['tok_per_s'] or 0:.0f} tok/s")


if __name__ == "__main__":
    main()
