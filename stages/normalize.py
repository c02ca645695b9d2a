"""Stage `normalize`: fit per-dimension mean/std and mean row norm on the train activations.

    uv run python -m stages.normalize --params params.yaml --acts data/extract/train --out data/normalize

Writes ``<out>/stats.safetensors`` and ``<out>/stats.json`` (with the shard manifest digest).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from saepipe.activations.config import NormalizeConfig
from saepipe.activations.normalize import STATS_FILE, normalize
from saepipe.runtime.params import read_params, section


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with `normalize:`")
@click.option("--acts", "acts_dir", default="data/extract/train", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="train shard folder")
@click.option("--out", "out_dir", default="data/normalize", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder")
def main(params_path: Path, acts_dir: Path, out_dir: Path) -> None:
    """Fit normalization statistics on extracted activations."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = NormalizeConfig.from_dict(section(read_params(params_path), "normalize"))
        stats = normalize(acts_dir, out_dir, config.chunk_rows)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{out_dir / STATS_FILE}: {stats.n_rows} rows, mean norm {stats.mean_norm:.4g}, "
               f"digest {stats.digest()}")


if __name__ == "__main__":
    main()
