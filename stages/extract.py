"""Stage `extract`: store the activations of every site of the sweep, all from one forward pass.

    uv run python -m stages.extract --params params.yaml --texts data/prepare/texts.parquet --out data/extract

Reads ``model``, ``extract:`` (how texts become rows) and ``sweep.sites`` (which sites, e.g.
``[6.mlp, 3.attn]``). Writes ``<out>/<site>/train/`` and ``<out>/<site>/eval/`` (Arrow shards +
manifest.json each) and ``<out>/extract.json`` (what the pass did). Each batch runs once, to the
deepest site, and every site is read from that pass. An interrupted run resumes from its last
complete shards when rerun with the same settings; a site already extracted is not run again.
Started by ``mlx.launch`` on several ranks, each rank extracts a contiguous share of the texts
(every site) into ``<site>/<split>/rank-<r>/`` and rank 0 writes one manifest per site and split
over all of them (``saepipe.activations.ranked_extract``). A local model (``model:`` a .gguf file or
a folder) must lie under ``--models`` (``data/models/``, a dependency of this stage and of evaluate),
so DVC reruns them when it changes. The texts are checked against the sha256 prepare recorded in the
``counts.json`` beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from saepipe.activations.config import ExtractConfig
from saepipe.activations.extract import PASS_FILE, extract
from saepipe.activations.ranked_extract import extract_ranked
from saepipe.lm.model import load_model
from saepipe.lm.sites import sweep_sites
from saepipe.parallel.ranks import Ranks
from saepipe.runtime.params import read_params, section
from saepipe.texts.prepare import verify_prepared
from stages import MODELS_DIR, checked_model_spec, stage_run


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="params file with `model:`, `extract:` and `sweep.sites`")
@click.option("--texts", "texts_path", default="data/prepare/texts.parquet", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="prepare's texts.parquet")
@click.option("--out", "out_dir", default="data/extract", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="output folder (one folder per site)")
@click.option("--models", "models_dir", default=str(MODELS_DIR), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="the folder a local model file or folder must be in (a dependency of the stage)")
def main(params_path: Path, texts_path: Path, out_dir: Path, models_dir: Path) -> None:
    """Extract activations of the sites named in params.yaml's sweep.sites, in one pass."""
    with stage_run("extract", out_dir):
        params = read_params(params_path)
        config = ExtractConfig.from_dict(section(params, "extract"))
        sites = sweep_sites(section(params, "sweep"))
        spec = checked_model_spec(params, models_dir)
        if not texts_path.exists():
            raise FileNotFoundError(f"texts file not found: {texts_path} (run the prepare stage first)")
        verify_prepared(texts_path)
        loaded = load_model(spec)
        ranks = Ranks.world()
        if ranks.distributed:
            manifests = extract_ranked(loaded, texts_path, out_dir, config, sites, ranks)
        else:
            manifests = extract(loaded, texts_path, out_dir, config, sites)
    if not ranks.is_main:
        return
    for site, splits in manifests.items():
        for split, m in splits.items():
            click.echo(f"{out_dir / site.id / split}: {m['n_tokens']} rows of {m['site']} ({m['dtype']}, "
                       f"{len(m['shards'])} shards, digest {m['digest']})")
    for split, p in json.loads((out_dir / PASS_FILE).read_text()).items():
        if p["sites_run"]:
            on = f" on {p['ranks']} ranks" if p.get("ranks", 1) > 1 else ""
            click.echo(f"{split}: one pass to layer {p['stop_layer']} for {', '.join(p['sites_run'])}{on}: "
                       f"{p['batches']} batches, {p['rows']} rows per site in {p['seconds']:.1f} s"
                       + (f" (reused: {', '.join(p['sites_reused'])})" if p["sites_reused"] else ""))
        else:
            click.echo(f"{split}: every site already extracted ({', '.join(p['sites_reused'])})")


if __name__ == "__main__":
    main()
