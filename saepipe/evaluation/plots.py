"""Offline plots and a self-contained HTML report for ``evaluate``.

Training curves come from dvclive's step-metric files (``<live>/plots/metrics/**/<name>.tsv``:
tab-separated with a ``step`` column, the value in the column named after the metric, optionally a
``timestamp``). Figures are PNGs drawn with matplotlib's Agg backend; the HTML report embeds them as
base64 so it opens without a network (``dvc plots show`` pages load Vega from a CDN).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saepipe.evaluation.metrics import DensityHistogram
from saepipe.runtime.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)


class Series(NamedTuple):
    steps: np.ndarray
    values: np.ndarray


def read_live_metrics(live_dir: str | Path) -> dict[str, Series]:
    """Every step-metric series under ``live_dir/plots/metrics`` by name (``train/loss``...).

    Missing folders give {}; a file without a ``step`` column or numeric values is skipped with a
    warning (plots are a by-product and must not fail the stage).
    """
    root = Path(live_dir) / "plots" / "metrics"
    series: dict[str, Series] = {}
    for path in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        name = path.relative_to(root).with_suffix("").as_posix()
        try:
            series[name] = _read_tsv(path)
        except (ValueError, KeyError) as err:
            log.warning("skipping %s: %s", path, err)
    return series


def _read_tsv(path: Path) -> Series:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError("no rows")
    columns = list(rows[0])
    if "step" not in columns:
        raise KeyError(f"no step column (columns: {columns})")
    value_cols = [c for c in columns if c not in ("step", "timestamp")]
    col = "value" if "value" in value_cols else (path.stem if path.stem in value_cols else value_cols[-1])
    steps = np.array([float(r["step"]) for r in rows])
    values = np.array([float(r[col]) if r[col] not in ("", None) else math.nan for r in rows])
    return Series(steps, values)


def _pyplot() -> Any:
    """pyplot on the Agg backend (no display, no GUI toolkit)."""
    import matplotlib  # lazy: the backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend choice above

    return plt


def plot_training_curves(series: Mapping[str, Series], path: str | Path) -> Path | None:
    """One panel per series (log y for positive losses); None when there is nothing to draw."""
    if not series:
        return None
    plt = _pyplot()
    n = len(series)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    ordered = sorted(series.items(), key=lambda item: ("loss" not in item[0], item[0]))
    for ax, (name, s) in zip(axes.flat, ordered, strict=False):
        ax.plot(s.steps, s.values, lw=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        finite = s.values[np.isfinite(s.values)]
        if "loss" in name and finite.size and (finite > 0).all():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_density_histogram(hist: DensityHistogram, path: str | Path) -> Path:
    """Bar chart of log10 feature density; dead latents are counted in the title."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    widths = np.diff(hist.edges)
    ax.bar(hist.edges[:-1], hist.counts, width=widths, align="edge", edgecolor="black", lw=0.3)
    ax.set_xlabel("log10(feature density)  (fraction of eval tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"Feature density ({hist.n_dead} dead latents not shown)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        _pyplot().close(fig)
    return path


def write_density_csv(hist: DensityHistogram, path: str | Path) -> Path:
    """Histogram as CSV: ``log10_density`` (bin centre), ``bin_low``, ``bin_high``, ``count``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO(newline="")
    w = csv.writer(out)
    w.writerow(["log10_density", "bin_low", "bin_high", "count"])
    for lo, hi, c in zip(hist.edges[:-1], hist.edges[1:], hist.counts, strict=True):
        w.writerow([f"{(lo + hi) / 2:.6g}", f"{lo:.6g}", f"{hi:.6g}", int(c)])
    return atomic_write_text(path, out.getvalue())


def write_html_report(
    path: str | Path,
    *,
    title: str,
    metrics: Mapping[str, Any],
    health: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, str | Path],
) -> Path:
    """One self-contained HTML page: metric table, health checks and the PNGs inlined as base64."""
    rows = "\n".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                     for k, v in metrics.items() if not isinstance(v, (dict, list)))
    checks = "\n".join(
        f"<tr class={'ok' if c.get('ok') else 'bad'}><td>{html.escape(name)}</td>"
        f"<td>{'pass' if c.get('ok') else 'FAIL'}</td><td>{html.escape(_fmt(c.get('value')))}</td>"
        f"<td>{html.escape(str(c.get('expected', '')))}</td></tr>"
        for name, c in health.items())
    figures = "\n".join(
        f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
        f"src='data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}'>"
        for caption, p in images.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:2px 8px}} .ok td:nth-child(2){{color:green}}
.bad td:nth-child(2){{color:red;font-weight:bold}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Health checks</h2><table>{checks}</table>
<h2>Metrics</h2><table>{rows}</table>
{figures}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, page)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


__all__ = [
    "Series",
    "plot_density_histogram",
    "plot_training_curves",
    "read_live_metrics",
    "write_density_csv",
    "write_html_report",
]
