"""Stage `prepare`: read the texts named in params.yaml, clean/filter/dedupe/split them, write Parquet.

    uv run python -m stages.prepare --params params.yaml --out data/prepare

Writes ``<out>/texts.parquet`` (columns id, text, source, split) and ``<out>/counts.json`` (metrics).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from saepipe.runtime.params import read_params, section
from saepipe.texts.config import PrepareConfig
from saepipe.texts.prepare import run_prepare, write_prepared


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with a `prepare:` section")
@click.option("--out", "out_dir", default="data/prepare", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder")
def main(params_path: Path, out_dir: Path) -> None:
    """Prepare the texts the later stages read."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = PrepareConfig.from_dict(section(read_params(params_path), "prepare"))
        result = run_prepare(config)
    except (ValueError, KeyError, TypeError, FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    texts_path, counts_path = write_prepared(result, out_dir)
    c = result.counts
    click.echo(
        f"{texts_path}: {c.kept} texts ({c.train} train, {c.eval} eval) of {c.read} read; "
        f"dropped {c.too_short} short, {c.duplicate} duplicate, {c.over_max_texts} over max_texts; "
        f"{c.truncated} truncated. Counts: {counts_path}"
    )


if __name__ == "__main__":
    main()
