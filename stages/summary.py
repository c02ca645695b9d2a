"""Stage `summary`: every run of the sweep side by side (table, Pareto view, offline page).

    python -m stages.summary --params params.yaml --evaluate data/evaluate --out data/summary

Reads ``sweep:`` (which (site, variant) runs exist) and each run's
``<evaluate>/<site>/<variant>/metrics.json``. Writes ``<out>/runs.csv``, ``runs.md`` (the table),
``pareto.png`` (FVU and CE-loss score against L0 and width) and ``index.html`` (table + plot +
links to each run's report and dashboard; opens offline). Prints the table (``saepipe repro``
prints a one-run sweep's headline metrics after it).
"""

from __future__ import annotations

from pathlib import Path

import click

from saepipe.evaluation.summary import collect_runs, markdown_table, write_summary
from saepipe.runtime.params import read_params, section
from saepipe.sae.config import SweepConfig


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with `sweep:`")
@click.option("--evaluate", "evaluate_dir", default="data/evaluate", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="the evaluate stages' outputs")
@click.option("--out", "out_dir", default="data/summary", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder")
def main(params_path: Path, evaluate_dir: Path, out_dir: Path) -> None:
    """Compare every (site, variant) run of params.yaml's sweep."""
    try:
        sweep = SweepConfig.from_dict(section(read_params(params_path), "sweep"))
        runs = collect_runs(evaluate_dir, sweep.runs())
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    paths = write_summary(runs, out_dir)
    click.echo(markdown_table(runs).rstrip())
    click.echo(f"summary of {len(runs)} run(s): {paths['index.html']} (offline), {paths['pareto.png']}, "
               f"{paths['runs.csv']}")


if __name__ == "__main__":
    main()
