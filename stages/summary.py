"""Print the headline metrics of the last pipeline run (the end of ``./saepipe.sh repro``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

HEADLINE = (
    ("fvu", "FVU (fraction of variance unexplained)", "{:.4f}"),
    ("explained_variance", "explained variance", "{:.4f}"),
    ("l0", "L0 (active latents per token)", "{:.1f}"),
    ("dead_fraction", "dead latents", "{:.1%}"),
    ("ce_loss_score", "CE-loss score (1 = lossless splice)", "{:.4f}"),
    ("ce_clean", "CE clean (nats)", "{:.4f}"),
    ("ce_spliced", "CE with SAE spliced in (nats)", "{:.4f}"),
    ("kl_spliced", "KL(clean || spliced) per token (nats)", "{:.4f}"),
    ("kl_score", "KL score", "{:.4f}"),
)


@click.command()
@click.option("--metrics", "metrics_path", default="data/evaluate/metrics.json", show_default=True,
              type=click.Path(path_type=Path))
def main(metrics_path: Path) -> None:
    if not metrics_path.exists():
        raise click.ClickException(f"{metrics_path} not found: run the pipeline first (dvc repro)")
    metrics = json.loads(metrics_path.read_text())
    click.echo(f"\nsaepipe results ({metrics_path}):")
    for key, label, fmt in HEADLINE:
        if key in metrics and isinstance(metrics[key], (int, float)):
            click.echo(f"  {label:<42} {fmt.format(metrics[key])}")
    checks = metrics.get("health", {})
    if checks:
        failed = [name for name, check in checks.items() if not check.get("ok", True)]
        click.echo(f"  health checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    click.echo("Plots: data/evaluate/report.html (offline), data/evaluate/plots/*.png")


if __name__ == "__main__":
    main()
