"""The results of a pipeline run: one run's headline metrics, and every run of a sweep side by side.

``headline`` is what ``saepipe repro`` prints for one SAE. ``collect_runs`` + ``write_summary``
are the ``summary`` stage: a table of every (site, variant) run (CSV and markdown), the usual SAE
Pareto view (FVU and CE-loss score against L0 and against width, one series per site, the frontier
of each site drawn) as a PNG, and an HTML page (self-contained, opens offline) with both and links
to each run's report and dashboard.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from saepipe.lm.sites import parse_site_id
from saepipe.runtime.files import atomic_write, atomic_write_bytes

DATA = Path("data")
SUMMARY_DIR = DATA / "summary"
"""Where the summary stage writes (relative to the project root)."""


def run_dir(stage: str, site: str, variant: str) -> Path:
    """A run's folder of ``stage``'s outputs, e.g. ``data/evaluate/6.mlp/default``."""
    return DATA / stage / site / variant


def metrics_path(site: str, variant: str) -> Path:
    """Where the evaluate stage writes a run's metrics (relative to the project root)."""
    return run_dir("evaluate", site, variant) / "metrics.json"


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
"""(metrics.json key, label, format) of each headline line, in order."""


def read_metrics(path: str | Path) -> dict[str, Any]:
    """The evaluate stage's metrics; a missing file says to run the pipeline first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the pipeline first (dvc repro)")
    return json.loads(path.read_text())


def headline(metrics: dict[str, Any], source: str | Path) -> list[str]:
    """The summary lines of one run (``source`` = its metrics.json): each headline metric present,
    then the health checks, then where its report and plots are."""
    source = Path(source)
    lines = [f"\nsaepipe results ({source}):"]
    for key, label, fmt in HEADLINE:
        if key in metrics and isinstance(metrics[key], (int, float)):
            lines.append(f"  {label:<42} {fmt.format(metrics[key])}")
    checks = metrics.get("health", {})
    if checks:
        failed = [name for name, check in checks.items() if not check.get("ok", True)]
        lines.append(f"  health checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    lines.append(f"Plots: {source.parent / 'report.html'} (offline), {source.parent}/plots/*.png")
    return lines


class Run(NamedTuple):
    """One (site, variant) SAE of a sweep and its evaluation."""

    site: str
    variant: str
    metrics: dict[str, Any]


COLUMNS = (
    # (name, metrics key or None for the run's own fields, format)
    ("site", None, "{}"), ("variant", None, "{}"), ("k", "k", "{}"), ("width", "d_hidden", "{}"),
    ("L0", "l0", "{:.1f}"), ("FVU", "fvu", "{:.4f}"), ("CE-loss score", "ce_loss_score", "{:.4f}"),
    ("KL", "kl_spliced", "{:.4f}"), ("dead", "dead_fraction", "{:.1%}"), ("pareto", None, "{}"),
)
"""The summary table's columns. ``pareto``: the run is on its site's FVU/L0 frontier (no run of the
same site has both lower-or-equal L0 and FVU, one of them strictly lower)."""


def collect_runs(evaluate_dir: str | Path, runs: Sequence[tuple[str, str]]) -> list[Run]:
    """Each (site, variant)'s metrics from ``<evaluate_dir>/<site>/<variant>/metrics.json``."""
    out = []
    for site, variant in runs:
        path = Path(evaluate_dir) / site / variant / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run evaluate@{site}-{variant} first")
        out.append(Run(site, variant, json.loads(path.read_text())))
    return out


def pareto_flags(runs: Sequence[Run], x: str = "l0", y: str = "fvu") -> list[bool]:
    """Per run: on the lower-left frontier of (x, y) among the runs of its site."""
    flags = []
    for r in runs:
        rx, ry = r.metrics.get(x, math.nan), r.metrics.get(y, math.nan)
        dominated = any(
            o.site == r.site and o is not r and o.metrics.get(x, math.nan) <= rx and o.metrics.get(y, math.nan) <= ry
            and (o.metrics.get(x) < rx or o.metrics.get(y) < ry)
            for o in runs)
        flags.append(not dominated and math.isfinite(rx) and math.isfinite(ry))
    return flags


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """The table's cells (formatted), one row per run."""
    flags = pareto_flags(runs)
    rows = []
    for run, on_front in zip(runs, flags, strict=True):
        own = {"site": run.site, "variant": run.variant, "pareto": "yes" if on_front else ""}
        cells = []
        for name, key, fmt in COLUMNS:
            value = own[name] if key is None else run.metrics.get(key)
            cells.append("" if value is None else fmt.format(value))
        rows.append(cells)
    return rows


def markdown_table(runs: Sequence[Run]) -> str:
    """The table as GitHub markdown."""
    head = [name for name, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(runs)]
    return "\n".join(lines) + "\n"


CSV_KEYS = ("layer", "component", "k", "d_hidden", "l0", "fvu", "explained_variance", "cosine", "ce_loss_score",
            "ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_score", "dead_fraction", "n_tokens")
"""Metrics written to runs.csv (unformatted), after site and variant."""


def _csv_bytes(runs: Sequence[Run]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["site", "variant", *CSV_KEYS, "pareto"])
    for run, on_front in zip(runs, pareto_flags(runs), strict=True):
        writer.writerow([run.site, run.variant, *(run.metrics.get(k, "") for k in CSV_KEYS), int(on_front)])
    return buf.getvalue().encode()


def _pyplot() -> Any:
    """pyplot on the Agg backend (no display, no GUI toolkit)."""
    import matplotlib  # lazy: the backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend choice above

    return plt


PANELS = (("l0", "L0 (active latents per token)", "fvu", "FVU (lower is better)"),
          ("l0", "L0 (active latents per token)", "ce_loss_score", "CE-loss score (higher is better)"),
          ("d_hidden", "width (latents)", "fvu", "FVU (lower is better)"),
          ("d_hidden", "width (latents)", "ce_loss_score", "CE-loss score (higher is better)"))
"""The Pareto view's panels: (x key, x label, y key, y label)."""


def plot_pareto(runs: Sequence[Run], path: str | Path) -> Path:
    """FVU and CE-loss score against L0 and against width: one colour per site, each point labelled
    with its variant, each site's frontier (best y so far along x) drawn as a step line."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    sites = list(dict.fromkeys(r.site for r in runs))
    colours = plt.get_cmap("tab10")
    for ax, (xk, xlabel, yk, ylabel) in zip(axes.flat, PANELS, strict=True):
        higher_better = yk == "ce_loss_score"
        for i, site in enumerate(sites):
            pts = sorted((r.metrics[xk], r.metrics[yk], r.variant) for r in runs
                         if r.site == site and _finite(r.metrics.get(xk)) and _finite(r.metrics.get(yk)))
            if not pts:
                continue
            colour = colours(i % 10)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colour, label=site, zorder=3)
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=colour)
            front, best = [], None
            for x, y, _ in pts:
                if best is None or (y > best if higher_better else y < best):
                    best = y
                    front.append((x, y))
            if len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=colour, lw=1, alpha=0.6)
        xs = [r.metrics.get(xk) for r in runs if _finite(r.metrics.get(xk))]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(title="site", fontsize=8)
    fig.suptitle(f"SAE sweep: {len(runs)} runs over {len(sites)} site(s)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def summary_html(runs: Sequence[Run], png: Path, title: str = "saepipe sweep summary") -> str:
    """A self-contained page: the table (with each run's report and dashboard linked relative to
    ``data/summary/``) and the Pareto PNG inlined as base64; no script, no network."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in COLUMNS) + "<th>report</th><th>dashboard</th>"
    body = []
    for run, cells in zip(runs, table_rows(runs), strict=True):
        report = f"../evaluate/{run.site}/{run.variant}/report.html"
        dashboard = f"../dashboard/{run.site}/{run.variant}/index.html"
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        body.append(f"<tr>{tds}<td><a href='{html.escape(report)}'>report</a></td>"
                    f"<td><a href='{html.escape(dashboard)}'>dashboard</a></td></tr>")
    image = base64.b64encode(Path(png).read_bytes()).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:nth-child(-n+2){{text-align:left}}
img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(runs)} runs. <b>pareto</b>: on its site's FVU/L0 frontier. Scores are on the held-out texts
(evaluate stage); each run's report and dashboard are linked.</p>
<table><tr>{head}</tr>
{chr(10).join(body)}
</table>
<h2>FVU and CE-loss score against L0 and width</h2>
<img alt="Pareto view" src="data:image/png;base64,{image}">
</body></html>
"""


SUMMARY_FILES = ("runs.csv", "runs.md", "pareto.png", "index.html")


def write_summary(runs: Sequence[Run], out: str | Path) -> dict[str, Path]:
    """runs.csv, runs.md, pareto.png and index.html in ``out``; their paths by name."""
    if not runs:
        raise ValueError("no runs to summarize")
    for run in runs:
        parse_site_id(run.site)  # a folder that is not a site is not a run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in SUMMARY_FILES}
    atomic_write_bytes(paths["runs.csv"], _csv_bytes(runs))
    atomic_write_bytes(paths["runs.md"], markdown_table(runs).encode())
    plot_pareto(runs, paths["pareto.png"])
    atomic_write_bytes(paths["index.html"], summary_html(runs, paths["pareto.png"]).encode())
    return paths


def results_lines(runs: Sequence[tuple[str, str]], root: str | Path = ".") -> list[str]:
    """What ``saepipe repro`` prints: one run's headline, or the summary table of a sweep."""
    root = Path(root)
    if len(runs) == 1:
        path = metrics_path(*runs[0])
        return headline(read_metrics(root / path), path)
    table = root / SUMMARY_DIR / "runs.md"
    if not table.exists():
        raise FileNotFoundError(f"{table} not found: run the pipeline first (dvc repro)")
    return [f"\nsaepipe sweep ({len(runs)} runs, {SUMMARY_DIR / 'runs.md'}):", table.read_text().rstrip(),
            f"Pareto view and links to every run: {SUMMARY_DIR / 'index.html'} (offline), "
            f"{SUMMARY_DIR / 'pareto.png'}"]


__all__ = ["COLUMNS", "HEADLINE", "PANELS", "SUMMARY_DIR", "SUMMARY_FILES", "Run", "collect_runs", "headline",
           "markdown_table", "metrics_path", "pareto_flags", "plot_pareto", "read_metrics",
           "results_lines", "run_dir", "summary_html", "table_rows", "write_summary"]
