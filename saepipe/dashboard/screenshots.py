"""PNG screenshots of a built dashboard (for the README), taken with headless Chromium from file://."""

from __future__ import annotations

from pathlib import Path

from saepipe.dashboard.browser import Browser, ensure_chromium

# The feature shown by default: among alive latents with a density between 1e-4 and 1e-2 (specific
# but not rare), the one with the largest max activation; any alive one otherwise.
_PICK = """(function(){
  var X = SAE.index, best = -1, bestv = -1, any = -1;
  for (var i = 0; i < X.n; i++) {
    var d = X.d ? X.d[i] : 0, m = X.max ? X.max[i] : 0;
    if (!(d > 0)) continue;
    if (any < 0) any = X.id[i];
    if (d >= 1e-4 && d <= 1e-2 && m > bestv) { bestv = m; best = X.id[i]; }
  }
  return best >= 0 ? best : any;
})()"""


def take_screenshots(
    site_dir: str | Path,
    out_dir: str | Path,
    *,
    feature: int | None = None,
    width: int = 1280,
    height: int = 1000,
    max_height: int = 2600,
    executable: str | None = None,
) -> list[Path]:
    """Save ``index.png`` (the first screen of the index) and ``feature-<id>.png`` (the feature page,
    up to ``max_height`` pixels) under ``out_dir``; returns their paths."""
    site = Path(site_dir).resolve()
    out = Path(out_dir)
    with Browser(executable or ensure_chromium(), width=width, height=height) as b:
        b.goto((site / "index.html").as_uri(), ready="index")
        index_png = b.screenshot(out / "index.png")
        fid = int(feature) if feature is not None else int(b.evaluate(_PICK))
        b.goto(f"{(site / 'feature.html').as_uri()}#{fid}", ready=f"feature:{fid}")
        feature_png = b.screenshot(
            out / f"feature-{fid}.png", full_page=True, max_height=max_height
        )
        if b.errors:
            raise RuntimeError(f"the pages reported errors: {b.errors}")
    return [index_png, feature_png]
