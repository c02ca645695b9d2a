"""Stage `analyze`: what each latent of the trained SAE fires on and does, for the dashboard.

    python -m stages.analyze --params params.yaml --sae data/train/sae.safetensors \
        --acts data/extract --out data/analyze

Reads ``analyze:`` (``AnalysisConfig``) and ``model`` from params; encodes every row of the extract
splits (``analyze.splits``, default train then eval) with the SAE and writes the dashboard's data
contract into ``--out`` (``saepipe.analysis.writer``): features.parquet, examples.parquet,
token_features.parquet and summary.json. Prints the time of each phase.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from saepipe.analysis.config import AnalysisConfig
from saepipe.analysis.rows import ShardRows
from saepipe.analysis.run import analyze
from saepipe.lm import model as lm_model
from saepipe.runtime.params import read_params, section
from saepipe.sae.topk import load_sae
from stages import MODELS_DIR, checked_model_spec, stage_run

log = logging.getLogger("stages.analyze")


def open_splits(acts_dir: Path, splits: tuple[str, ...]) -> list[ShardRows]:
    """The shard folder of each split, all extracted at one site."""
    sources = []
    for split in splits:
        folder = acts_dir / split
        if not (folder / "manifest.json").exists():
            raise click.ClickException(f"{folder} holds no finished extract (run the extract stage)")
        sources.append(ShardRows(folder, split))
    sites = {(s.manifest.get("layer"), s.manifest.get("component")) for s in sources}
    if len(sites) > 1:
        raise click.ClickException(f"the splits were extracted at different sites: {sorted(sites, key=str)}")
    return sources


def check_sae(sae, loaded, layer: int, component: str) -> None:
    """Refuse an SAE trained on another model or site; one that records no identity only warns."""
    _, reasons = sae.compatibility(loaded, layer, component)
    for r in reasons:
        if r.unverified:
            log.warning("cannot verify the SAE: %s", r)
    fatal = [r for r in reasons if not r.unverified]
    if fatal:
        raise click.ClickException("the SAE does not fit these activations: " + "; ".join(fatal))


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--sae", "sae_path", default="data/train/sae.safetensors", show_default=True,
              type=click.Path(path_type=Path), help="trained SAE file")
@click.option("--acts", "acts_dir", default="data/extract", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="extract's output (one folder per split)")
@click.option("--out", "out_dir", default="data/analyze", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder")
@click.option("--models", "models_dir", default=str(MODELS_DIR), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="the folder a local model file or folder must be in (a dependency of the stage)")
def main(params_path: Path, sae_path: Path, acts_dir: Path, out_dir: Path, models_dir: Path) -> None:
    """Analyze every latent of the SAE over the extracted activations."""
    with stage_run("analyze", out_dir):
        params = read_params(params_path)
        config = AnalysisConfig.from_dict(section(params, "analyze"))
        spec = checked_model_spec(params, models_dir)
        sae = load_sae(sae_path)
        sources = open_splits(acts_dir, config.splits)
        loaded = lm_model.load_model(spec)
        manifest = sources[0].manifest
        check_sae(sae, loaded, int(manifest["layer"]), str(manifest["component"]))
        # Scratch files (~16 bytes per row and kept latent) next to the output, not in a RAM-backed /tmp.
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tables = analyze(sources, sae, loaded, config, out_dir, scratch_dir=out_dir.parent, report=click.echo)
    s = tables.summary
    click.echo(f"{out_dir}: {s['n_features']} latents ({s['dead']} dead) over {s['n_tokens']} tokens, "
               f"{tables.examples.num_rows} contexts, {tables.token_features.num_rows} tokens indexed "
               f"in {s['seconds']['total']:.1f} s")


if __name__ == "__main__":
    main()
