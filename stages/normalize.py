"""Stage `normalize`: fit per-dimension mean/std and mean row norm on the train activations.

    uv run python -m stages.normalize --params params.yaml --acts data/extract/train --out data/normalize

Writes ``<out>/stats.safetensors`` and ``<out>/stats.json`` (with the shard manifest digest). The
shards are checked against their manifest, and the manifest against ``--site`` (the sweep site the
shards must hold, e.g. ``6.mlp``), also when the stage runs outside DVC.
"""

from __future__ import annotations

from pathlib import Path

import click

from saepipe.activations.config import NormalizeConfig
from saepipe.activations.normalize import STATS_FILE, normalize
from saepipe.lm.sites import parse_site_id
from saepipe.runtime.params import read_params, section
from stages import stage_run


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with `normalize:`")
@click.option("--acts", "acts_dir", default="data/extract/train", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="train shard folder")
@click.option("--out", "out_dir", default="data/normalize", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder")
@click.option("--site", "site_id", default=None, help="site the shards must hold (layer.component, e.g. 6.mlp)")
def main(params_path: Path, acts_dir: Path, out_dir: Path, site_id: str | None) -> None:
    """Fit normalization statistics on extracted activations."""
    with stage_run("normalize", out_dir):
        params = read_params(params_path)
        config = NormalizeConfig.from_dict(section(params, "normalize"))
        site = None if site_id is None else parse_site_id(site_id)
        stats = normalize(acts_dir, out_dir, config.chunk_rows, layer=None if site is None else site.layer,
                          component=None if site is None else site.component)
    click.echo(f"{out_dir / STATS_FILE}: {stats.n_rows} rows, mean norm {stats.mean_norm:.4g}, "
               f"digest {stats.digest()}")


if __name__ == "__main__":
    main()
