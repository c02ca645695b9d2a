"""Print the headline metrics of the last pipeline run (the end of ``./saepipe.sh repro``)."""

from __future__ import annotations

from pathlib import Path

import click

from saepipe.evaluation.summary import METRICS_PATH, headline, read_metrics


@click.command()
@click.option("--metrics", "metrics_path", default=str(METRICS_PATH), show_default=True,
              type=click.Path(path_type=Path))
def main(metrics_path: Path) -> None:
    """Print the headline metrics of data/evaluate/metrics.json."""
    try:
        metrics = read_metrics(metrics_path)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from e
    for line in headline(metrics, metrics_path):
        click.echo(line)


if __name__ == "__main__":
    main()
