"""The headline metrics of a pipeline run, as printed at the end of ``saepipe repro``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_PATH = Path("data/evaluate/metrics.json")
"""Where the evaluate stage writes its metrics (relative to the project root)."""

REPORT_PATH = Path("data/evaluate/report.html")

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


def read_metrics(path: str | Path = METRICS_PATH) -> dict[str, Any]:
    """The evaluate stage's metrics; a missing file says to run the pipeline first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the pipeline first (dvc repro)")
    return json.loads(path.read_text())


def headline(metrics: dict[str, Any], source: str | Path = METRICS_PATH) -> list[str]:
    """The summary lines: each headline metric present, then the health checks, then where the plots are."""
    lines = [f"\nsaepipe results ({source}):"]
    for key, label, fmt in HEADLINE:
        if key in metrics and isinstance(metrics[key], (int, float)):
            lines.append(f"  {label:<42} {fmt.format(metrics[key])}")
    checks = metrics.get("health", {})
    if checks:
        failed = [name for name, check in checks.items() if not check.get("ok", True)]
        lines.append(f"  health checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    lines.append(f"Plots: {REPORT_PATH} (offline), {REPORT_PATH.parent}/plots/*.png")
    return lines


__all__ = ["HEADLINE", "METRICS_PATH", "REPORT_PATH", "headline", "read_metrics"]
