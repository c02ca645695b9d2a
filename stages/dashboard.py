"""Stage `dashboard`: the offline feature dashboard (a static site) from the analyze stage's output.

    python -m stages.dashboard --analysis data/analyze --out data/dashboard

Open ``data/dashboard/index.html`` in a browser straight from disk (no server, no network), or
serve it: ``python -m saepipe.dashboard serve data/dashboard``.
"""

from __future__ import annotations

from pathlib import Path

import click

from saepipe.dashboard.data import ContractError
from saepipe.dashboard.site import build_site
from stages import stage_run


@click.command()
@click.option("--analysis", "analysis_dir", default="data/analyze", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="the analyze stage's output")
@click.option("--out", "out_dir", default="data/dashboard", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="site folder")
def main(analysis_dir: Path, out_dir: Path) -> None:
    """Build the static site of every latent of the analysis."""
    with stage_run("dashboard", out_dir):
        try:
            info = build_site(analysis_dir, out_dir)
        except ContractError as e:
            raise click.ClickException(str(e)) from e
    click.echo(f"dashboard: {info.n_features} latents, {info.n_blocks} data files, "
               f"{info.bytes_written / 1e6:.1f} MB in {info.seconds:.1f} s -> open {info.index}")


if __name__ == "__main__":
    main()
