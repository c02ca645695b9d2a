"""Stage `prepare`: read the texts named in params.yaml, clean/filter/dedupe/split them, write Parquet.

    uv run python -m stages.prepare --params params.yaml --out data/prepare

Writes ``<out>/texts.parquet`` (columns id, text, source, split) and ``<out>/counts.json`` (what was
kept and dropped, the hub dataset's commit sha, the parquet's sha256).

A local ``prepare.source`` must lie under ``--sources`` (``data/sources/``, a dependency of this stage
in dvc.yaml): DVC reruns a stage only for inputs it knows, so a file elsewhere could change without
prepare ever rerunning. A symlink there to a file elsewhere works too (DVC hashes the target).
"""

from __future__ import annotations

from pathlib import Path

import click

from saepipe.runtime.params import read_params, section
from saepipe.texts.config import PrepareConfig
from saepipe.texts.prepare import run_prepare, write_prepared
from saepipe.texts.sources import source_kind
from stages import check_inside, stage_run

SOURCES_DIR = Path("data/sources")
"""Where local text files live (a folder dep of prepare in dvc.yaml, kept in git with its README)."""


def check_local_source(source: str, sources_dir: Path) -> None:
    """A local source must be inside ``sources_dir`` (compared as written: a symlink there may point anywhere)."""
    if source_kind(source) == "local":
        check_inside("prepare.source", source, sources_dir,
                     "builtin, a hub dataset name, or a file or folder", "prepare")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with a `prepare:` section")
@click.option("--out", "out_dir", default="data/prepare", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder")
@click.option("--sources", "sources_dir", default=str(SOURCES_DIR), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="the folder local text sources must be in (a dependency of the stage)")
def main(params_path: Path, out_dir: Path, sources_dir: Path) -> None:
    """Prepare the texts the later stages read."""
    with stage_run("prepare", out_dir):
        config = PrepareConfig.from_dict(section(read_params(params_path), "prepare"))
        check_local_source(config.source, sources_dir)
        result = run_prepare(config)
        texts_path, counts_path = write_prepared(result, out_dir)
    c = result.counts
    click.echo(
        f"{texts_path}: {c.kept} texts ({c.train} train, {c.eval} eval) of {c.read} read; "
        f"dropped {c.too_short} short, {c.duplicate} duplicate, {c.over_max_texts} over max_texts; "
        f"{c.truncated} truncated. Counts: {counts_path}"
    )


if __name__ == "__main__":
    main()
