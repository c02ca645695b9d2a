"""Stage `extract`: store one site's activations for the prepared texts as resumable shard folders.

    uv run python -m stages.extract --params params.yaml --texts data/prepare/texts.parquet --out data/extract

Writes ``<out>/train/`` and ``<out>/eval/`` (Arrow shards + manifest.json each). An interrupted run
resumes from its last complete shard when rerun with the same settings. Started by ``mlx.launch``
on several ranks, each rank extracts a contiguous share of the texts into ``<split>/rank-<r>/``
and rank 0 writes one manifest over all of them (``saepipe.activations.ranked_extract``). A local
model (``model:`` a .gguf file or a folder) must lie under ``--models`` (``data/models/``, a
dependency of this stage and of evaluate), so DVC reruns them when it changes. The texts are checked
against the sha256 prepare recorded in the ``counts.json`` beside them.
"""

from __future__ import annotations

from pathlib import Path

import click

from saepipe.activations.config import ExtractConfig
from saepipe.activations.extract import extract
from saepipe.activations.ranked_extract import extract_ranked
from saepipe.lm.model import load_model
from saepipe.parallel.ranks import Ranks
from saepipe.runtime.params import read_params, section
from saepipe.texts.prepare import verify_prepared
from stages import MODELS_DIR, checked_model_spec, stage_run


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file with `model:` and `extract:`")
@click.option("--texts", "texts_path", default="data/prepare/texts.parquet", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="prepare's texts.parquet")
@click.option("--out", "out_dir", default="data/extract", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder (train/ and eval/)")
@click.option("--models", "models_dir", default=str(MODELS_DIR), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="the folder a local model file or folder must be in (a dependency of the stage)")
def main(params_path: Path, texts_path: Path, out_dir: Path, models_dir: Path) -> None:
    """Extract activations of the site named in params.yaml."""
    with stage_run("extract", out_dir):
        params = read_params(params_path)
        config = ExtractConfig.from_dict(section(params, "extract"))
        spec = checked_model_spec(params, models_dir)
        if not texts_path.exists():
            raise FileNotFoundError(f"texts file not found: {texts_path} (run the prepare stage first)")
        verify_prepared(texts_path)
        loaded = load_model(spec)
        ranks = Ranks.world()
        if ranks.distributed:
            manifests = extract_ranked(loaded, texts_path, out_dir, config, ranks)
        else:
            manifests = extract(loaded, texts_path, out_dir, config)
    if not ranks.is_main:
        return
    for split, m in manifests.items():
        click.echo(f"{out_dir / split}: {m['n_tokens']} rows of {m['site']} ({m['dtype']}, "
                   f"{len(m['shards'])} shards, digest {m['digest']})")


if __name__ == "__main__":
    main()
