"""Stage `extract`: store one site's activations for the prepared texts as resumable shard folders.

    uv run python -m stages.extract --params params.yaml --texts data/prepare/texts.parquet --out data/extract

Writes ``<out>/train/`` and ``<out>/eval/`` (Arrow shards + manifest.json each). An interrupted run
resumes from its last complete shard when rerun with the same settings. Started by ``mlx.launch``
on several ranks, each rank extracts a contiguous share of the texts into ``<split>/rank-<r>/``
and rank 0 writes one manifest over all of them (``saepipe.activations.ranked_extract``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from saepipe.activations.config import ExtractConfig
from saepipe.activations.extract import extract
from saepipe.activations.ranked_extract import extract_ranked
from saepipe.lm.model import load_model
from saepipe.parallel.ranks import Ranks
from saepipe.runtime.params import model_spec, read_params, section


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with `model:` and `extract:`")
@click.option("--texts", "texts_path", default="data/prepare/texts.parquet", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="prepare's texts.parquet")
@click.option("--out", "out_dir", default="data/extract", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder (train/ and eval/)")
def main(params_path: Path, texts_path: Path, out_dir: Path) -> None:
    """Extract activations of the site named in params.yaml."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = read_params(params_path)
        config = ExtractConfig.from_dict(section(params, "extract"))
        if not texts_path.exists():
            raise FileNotFoundError(f"texts file not found: {texts_path} (run the prepare stage first)")
        loaded = load_model(model_spec(params))
        ranks = Ranks.world()
        if ranks.distributed:
            manifests = extract_ranked(loaded, texts_path, out_dir, config, ranks)
        else:
            manifests = extract(loaded, texts_path, out_dir, config)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if not ranks.is_main:
        return
    for split, m in manifests.items():
        click.echo(f"{out_dir / split}: {m['n_tokens']} rows of {m['site']} ({m['dtype']}, "
                   f"{len(m['shards'])} shards, digest {m['digest']})")


if __name__ == "__main__":
    main()
