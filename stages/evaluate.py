"""Stage evaluate: score the trained SAE on the held-out texts; write metrics, plots and a report.

    python -m stages.evaluate --params params.yaml --site 6.mlp --sae data/train/6.mlp/default/sae.safetensors \
        --texts data/prepare/texts.parquet --out data/evaluate/6.mlp/default

The site is ``--site`` (layer.component) or, without it, the one the SAE file records.

Outputs in ``--out``: ``metrics.json`` (every metric, flat scalars plus ``health``), ``headline.json``
(the few metrics ``dvc exp show`` and ``dvc metrics`` list), ``density.csv`` (log10 feature-density
histogram), ``plots/*.png`` and ``report.html`` (offline). The texts are checked against prepare's
sha256, the SAE file against its own tensor checksum and the model/site it was trained on.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import click

from saepipe.activations.config import ExtractConfig
from saepipe.evaluation.config import EvaluateConfig
from saepipe.evaluation.evaluate import EvalResult, evaluate_sae, health_checks
from saepipe.evaluation.metrics import density_histogram
from saepipe.evaluation.plots import (
    plot_density_histogram,
    plot_training_curves,
    read_live_metrics,
    write_density_csv,
    write_html_report,
)
from saepipe.lm import model as lm_model
from saepipe.lm.sites import Site, parse_site_id
from saepipe.runtime.files import write_metrics_json
from saepipe.runtime.params import read_params, section
from saepipe.sae.topk import load_sae
from saepipe.texts.prepare import read_split, verify_prepared
from stages import MODELS_DIR, checked_model_spec, stage_run

log = logging.getLogger("stages.evaluate")

HEADLINE = {  # headline.json key: metrics.json key (named apart from train's headline)
    "fvu": "fvu", "l0": "l0", "dead_pct": "dead_fraction", "ce_loss_score": "ce_loss_score", "kl": "kl_spliced",
}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics ``dvc exp show`` lists: FVU, L0, dead %, CE-loss score, KL."""
    out = {name: metrics.get(key) for name, key in HEADLINE.items()}
    if isinstance(out["dead_pct"], float):
        out["dead_pct"] = 100 * out["dead_pct"]
    return out


def read_eval_texts(path: Path) -> list[str]:
    """The held-out (``split == "eval"``) texts of prepare's parquet, in file order, as extract reads them."""
    if not path.exists():
        raise FileNotFoundError(f"texts file not found: {path} (run the prepare stage)")
    verify_prepared(path)
    return read_split(path, "eval")[1]


def sae_site(sae: Any, site: str | None) -> Site:
    """``site`` parsed, or the site the SAE file records when ``site`` is None."""
    if site is not None:
        return parse_site_id(site)
    meta = getattr(sae, "metadata", None) or {}
    if meta.get("layer") is None or meta.get("component") is None:
        raise ValueError("the SAE file records no site: pass --site layer.component")
    return Site(int(meta["layer"]), str(meta["component"]))


def _check_site(sae: Any, loaded: Any, layer: int, component: str) -> None:
    """Refuse an SAE trained elsewhere; an SAE that records no identity only warns."""
    _, reasons = sae.compatibility(loaded, layer, component)
    for r in reasons:
        if r.unverified:
            log.warning("cannot verify the SAE: %s", r)
    fatal = [r for r in reasons if not r.unverified]
    if fatal:
        raise ValueError("the SAE does not fit this model/site: " + "; ".join(fatal))


def _write_outputs(out_dir: Path, result: EvalResult, metrics: dict[str, Any], health: dict[str, Any],
                   curves: dict[str, Any]) -> None:
    """metrics.json, density.csv, the PNGs and the HTML report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_json(out_dir / "metrics.json", {**metrics, "health": health})
    write_metrics_json(out_dir / "headline.json", headline(metrics))
    hist = density_histogram(result.sparsity.density, low=-math.ceil(math.log10(result.sparsity.n_tokens)))
    write_density_csv(hist, out_dir / "density.csv")
    images = {"Feature density": plot_density_histogram(hist, out_dir / "plots" / "feature_density.png")}
    curves_png = plot_training_curves(curves, out_dir / "plots" / "training_curves.png")
    if curves_png is not None:
        images = {"Training curves": curves_png, **images}
    write_html_report(out_dir / "report.html", title=f"SAE evaluation: {result.site.name}",
                      metrics=metrics, health=health, images=images)


def read_train_summary(path: Path | None) -> dict[str, Any]:
    """train's metrics.json ({} when not given or missing); not JSON is an error naming the file."""
    if path is None or not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): rerun train") from err
    return summary if isinstance(summary, dict) else {}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--site", default=None, help="layer.component the SAE reads (default: the one its file records)")
@click.option("--sae", "sae_path", required=True, type=click.Path(path_type=Path), help="trained SAE file")
@click.option("--texts", "texts_path", required=True, type=click.Path(path_type=Path), help="prepare's texts.parquet")
@click.option("--train-metrics", type=click.Path(path_type=Path), default=None, help="train's metrics.json")
@click.option("--train-live", type=click.Path(path_type=Path), default=None, help="train's dvclive folder")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--models", "models_dir", default=str(MODELS_DIR), show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="the folder a local model file or folder must be in (a dependency of the stage)")
def main(params_path: Path, site: str | None, sae_path: Path, texts_path: Path, train_metrics: Path | None,
         train_live: Path | None, out_dir: Path, models_dir: Path) -> None:
    """Score the SAE at its site on the eval split."""
    with stage_run("evaluate", out_dir):
        params = read_params(params_path)
        extract = ExtractConfig.from_dict(section(params, "extract"))
        config = EvaluateConfig.from_dict(section(params, "evaluate"))
        spec = checked_model_spec(params, models_dir)
        texts = read_eval_texts(texts_path)
        sae = load_sae(sae_path)
        where = sae_site(sae, site)
        loaded = lm_model.load_model(spec)
        _check_site(sae, loaded, where.layer, where.component)

        result = evaluate_sae(
            loaded, sae, texts, layer=where.layer, component=where.component, max_tokens=config.max_tokens,
            batch_size=config.batch_size, context_length=extract.context_length,
            skip_special_tokens=extract.skip_special_tokens,
        )
        metrics: dict[str, Any] = result.to_dict()
        train_summary = read_train_summary(train_metrics)
        curves = read_live_metrics(train_live) if train_live else {}
        health = health_checks(metrics, train_summary, sae.k, curves.get("loss", curves.get("train/loss")))
        metrics["k"] = sae.k
        metrics["d_hidden"] = sae.d_hidden
        _write_outputs(out_dir, result, metrics, health, curves)

    failed = [name for name, c in health.items() if not c["ok"]]
    click.echo(f"evaluate {result.site.name} on {result.reconstruction.n_rows} held-out tokens:")
    click.echo(f"  FVU {metrics['fvu']:.4f}  L0 {metrics['l0']:.1f}  dead {metrics['dead_fraction']:.1%}  "
               f"CE-loss score {metrics['ce_loss_score']:.4f}  KL {metrics['kl_spliced']:.4f}")
    click.echo(f"  health: {'all passed' if not failed else 'FAILED ' + ', '.join(failed)}")


if __name__ == "__main__":
    main()
