"""The dashboard in a real browser: headless Chromium, driven over the DevTools protocol.

The site is built from a full-size synthetic analysis (9,216 latents, 20 top contexts + 5 quantiles x 4
samples, windows of 32 tokens) and opened from file://, as a user opening data/dashboard/index.html
would. Screenshots go to $SAEPIPE_TEST_ARTIFACTS (default: tmp/test-artifacts/dashboard/ in the repo).

Chromium is found on the PATH or installed with apt where the suite may (root or password-less sudo).
If it cannot be had the tests FAIL with instructions; they are skipped only when asked to with
SAEPIPE_SKIP_BROWSER_TESTS=1.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from saepipe.dashboard import FeatureView, build_site, load_analysis, load_feature_record, serve
from saepipe.dashboard.browser import Browser, ChromiumUnavailable, dump_dom, ensure_chromium
from saepipe.dashboard.render import (
    fmt,
    fmt_count,
    fmt_density,
    js_to_exponential,
    js_to_precision,
    visible,
)
from saepipe.dashboard.synthetic import write_synthetic_analysis

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = (
    Path(os.environ.get("SAEPIPE_TEST_ARTIFACTS") or REPO / "tmp" / "test-artifacts") / "dashboard"
)
N_FEATURES = 9216

# Budgets (generous for a loaded 2-core CI machine; typical values are 5-10x lower).
INDEX_LOAD_S = 5.0
FEATURE_LOAD_S = 3.0
INDEX_WEIGHT = 1_500_000  # bytes loaded by index.html before any search
FEATURE_WEIGHT = 1_500_000  # bytes loaded by feature.html for one latent


@pytest.fixture(scope="module")
def chromium() -> str:
    if os.environ.get("SAEPIPE_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("SAEPIPE_SKIP_BROWSER_TESTS=1")
    try:
        return ensure_chromium(install=True)
    except ChromiumUnavailable as e:
        pytest.fail(
            f"{e} (set SAEPIPE_SKIP_BROWSER_TESTS=1 to skip these tests on purpose)", pytrace=False
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory, chromium) -> dict:
    root = tmp_path_factory.mktemp("dash")
    t0 = time.perf_counter()
    analysis = write_synthetic_analysis(root / "analysis", n_features=N_FEATURES)
    t1 = time.perf_counter()
    info = build_site(analysis, root / "site")
    t2 = time.perf_counter()
    print(
        f"\nsynthetic analysis {t1 - t0:.1f} s, build_site {t2 - t1:.1f} s "
        f"({info.bytes_written / 1e6:.1f} MB, {info.n_blocks} blocks)"
    )
    return {"analysis": analysis, "dir": root / "site", "info": info, "a": load_analysis(analysis)}


@pytest.fixture(scope="module")
def browser(chromium):
    with Browser(chromium, width=1280, height=900) as b:
        yield b


@pytest.fixture(autouse=True)
def no_page_errors(request):
    """Every test ends with no console errors, uncaught exceptions or failed loads in the page."""
    if "browser" not in request.fixturenames:
        yield
        return
    b = request.getfixturevalue("browser")
    b.errors.clear()
    yield
    assert b.errors == [], f"page errors: {b.errors}"


def weight(site_dir: Path, *rel: str) -> int:
    return sum((site_dir / r).stat().st_size for r in rel)


def dom_texts(browser, selector: str) -> list[str]:
    return browser.evaluate(
        f"Array.from(document.querySelectorAll({json.dumps(selector)})).map(e => e.textContent)"
    )


def test_index_from_file(site, browser):
    d = site["dir"]
    secs = browser.goto((d / "index.html").as_uri(), ready="index")
    page_weight = weight(
        d,
        "index.html",
        "assets/dashboard.css",
        "assets/common.js",
        "assets/index.js",
        "data/meta.js",
        "data/index.js",
    )
    print(f"\nindex: ready after {secs * 1000:.0f} ms, {page_weight / 1e3:.0f} kB")
    assert secs < INDEX_LOAD_S and page_weight < INDEX_WEIGHT
    browser.screenshot(ARTIFACTS / "index.png")
    assert browser.evaluate("document.querySelectorAll('#rows tr').length") == 100  # paginated
    assert dom_texts(browser, "#rows tr td.id")[:3] == ["#0", "#1", "#2"]
    assert "of 9,216 features" in browser.evaluate("document.getElementById('pager').textContent")
    bars = browser.evaluate("document.querySelectorAll('#density svg rect.b').length")
    assert bars > 20  # the density histogram
    assert browser.evaluate("document.querySelector('#stats').textContent").startswith(
        "Features9,216"
    )


def test_sort_filter_and_paginate(site, browser):
    browser.goto((site["dir"] / "index.html").as_uri(), ready="index")
    maxes = browser.evaluate("SAE.index.max")
    browser.evaluate(
        "(function(s){s.value='-max'; s.dispatchEvent(new Event('change'));})(document.getElementById('sort'))"
    )
    first = browser.evaluate("document.querySelector('#rows tr').getAttribute('data-id')")
    assert int(first) == max(range(len(maxes)), key=lambda i: (maxes[i] or 0, -i))
    browser.click("#page-next")
    assert "Showing 101\u2013200" in browser.evaluate(
        "document.getElementById('pager').textContent"
    )
    assert "sort=-max" in browser.evaluate("location.hash") and "page=2" in browser.evaluate(
        "location.hash"
    )
    # clicking the "dead" bar of the density histogram lists only dead latents
    browser.evaluate(
        "document.querySelector('#density svg rect.b.dead').parentNode.dispatchEvent(new MouseEvent('click'))"
    )
    dead_rows = browser.evaluate("document.querySelectorAll('#rows tr').length")
    n_dead = sum(1 for n in browser.evaluate("SAE.index.nf") if n == 0)
    assert (
        dead_rows == min(100, n_dead)
        and browser.evaluate("document.querySelectorAll('#rows tr.dead').length") == dead_rows
    )
    assert "dead features" in browser.evaluate("document.getElementById('filter').textContent")
    # the state lives in the URL: coming back (e.g. from a feature page) restores it
    browser.goto((site["dir"] / "index.html").as_uri() + "#sort=-d&page=3", ready="index")
    assert "Page 3 of 93" in browser.evaluate("document.getElementById('pager').textContent")
    dens = browser.evaluate(
        "Array.from(document.querySelectorAll('#rows tr')).map(r => SAE.index.d[+r.dataset.id])"
    )
    assert (
        dens == sorted(dens, reverse=True)
        and browser.evaluate("document.getElementById('sort').value") == "-d"
    )


def test_search_by_token_then_open_feature(site, browser):
    d = site["dir"]
    browser.goto((d / "index.html").as_uri(), ready="index")
    browser.type_text("#q", "paris")
    browser.wait_for("document.documentElement.dataset.search === 'done'")
    browser.screenshot(ARTIFACTS / "index-search.png")
    tokens = browser.evaluate(
        "Array.from(document.querySelectorAll('#results .res')).map(e => e.dataset.token)"
    )
    assert tokens[0] == " Paris"  # case and the leading space ignored; the spaced form ranks first
    chips = dom_texts(browser, "#results .res:first-child a.fchip b")
    assert {"#0", "#1", "#2"} <= set(chips)
    # open the first feature the way a user would: click its chip
    fid = int(chips[0][1:])
    browser.click("#results .res:first-child a.fchip")
    browser.wait_for(f"document.documentElement.dataset.ready === 'feature:{fid}'")
    assert browser.evaluate("location.pathname").endswith("/feature.html")
    on = browser.evaluate("document.querySelectorAll('.ctx .tk.on').length")
    assert on > 20
    # the max token of each top context is marked, highlighted, and carries its value on hover
    top_max = browser.evaluate(
        "Array.from(document.querySelectorAll('#h-top ~ .ctxs .tk.mx')).map(e => [e.textContent, e.title, e.className])"
    )
    assert len(top_max) == 20
    assert all("on" in cls.split() and " \u00b7 " in title for _, title, cls in top_max)
    assert any(text == " Paris" for text, _, _ in top_max)
    browser.screenshot(ARTIFACTS / f"feature-{fid}.png", full_page=True, max_height=3200)


def test_feature_page_matches_the_data(site, browser):
    """Every context on the page shows exactly the analysis' tokens (escaped, newlines as ↵) and
    activations; quantile sections come after the top contexts, highest first."""
    fid = 7
    t0 = time.perf_counter()
    secs = browser.goto(f"{(site['dir'] / 'feature.html').as_uri()}#{fid}", ready=f"feature:{fid}")
    wall = time.perf_counter() - t0
    block = f"data/features-{fid // 64:04d}.js"
    page_weight = weight(
        site["dir"],
        "feature.html",
        "assets/dashboard.css",
        "assets/common.js",
        "assets/feature.js",
        "data/meta.js",
        block,
    )
    print(
        f"\nfeature page: ready after {secs * 1000:.0f} ms ({wall * 1000:.0f} ms wall), {page_weight / 1e3:.0f} kB"
    )
    assert secs < FEATURE_LOAD_S and page_weight < FEATURE_WEIGHT
    rec = load_feature_record(site["a"], fid)
    rows = browser.evaluate(
        "Array.from(document.querySelectorAll('.ctx')).map(r => Array.from(r.querySelectorAll('.tk'))"
        ".map(t => [t.textContent, t.dataset.act ? +t.dataset.act : 0, t.classList.contains('mx')]))"
    )
    assert len(rows) == len(rec["examples"])
    for row, ex in zip(rows, rec["examples"], strict=True):
        assert [t[0] for t in row] == [visible(t) for t in ex["tokens"]]
        assert [t[1] for t in row] == pytest.approx([float(a) for a in ex["acts"]], rel=1e-6)
        assert [i for i, t in enumerate(row) if t[2]] == [ex["center"]]
    # hovering a highlighted token shows its value at once
    browser.hover(".ctx .tk.mx")
    tip = browser.wait_for(
        "document.querySelector('.tip').style.display === 'block' && document.querySelector('.tip').textContent"
    )
    ex0 = rec["examples"][0]
    assert tip == fmt(float(ex0["acts"][ex0["center"]])) + json.dumps(
        ex0["tokens"][ex0["center"]], ensure_ascii=False
    )
    browser.hover("h1")
    browser.wait_for("document.querySelector('.tip').style.display === 'none'")
    assert browser.evaluate("document.querySelector('.ctx .tk.mx').title").endswith(
        fmt(float(ex0["acts"][ex0["center"]]))
    )
    # no markup from the data reached the DOM
    assert (
        browser.evaluate(
            "document.querySelectorAll('.ctx-t *:not(.tk), .pill script, .pill b').length"
        )
        == 0
    )
    headings = dom_texts(browser, "#h-quant ~ h3")
    assert headings[0].startswith("Quantile 5 of 5 (highest)") and headings[-1].startswith(
        "Quantile 1 of 5 (lowest)"
    )
    promoted = dom_texts(browser, "section[aria-labelledby=h-pos] .pill")
    assert promoted == [visible(t).replace(" ", "\u2423") for t in rec["promoted_tokens"]]
    neighbours = browser.evaluate(
        "Array.from(document.querySelectorAll('section[aria-labelledby=h-nb] a')).map(a => a.getAttribute('href'))"
    )
    assert neighbours == [f"feature.html#{n}" for n in rec["neighbors"]]


def test_hostile_tokens_are_text(site, browser):
    """Tokens like <script>, &, quotes and newlines are shown as text, in search and on pages."""
    browser.goto((site["dir"] / "index.html").as_uri(), ready="index")
    browser.type_text("#q", "<script>")
    browser.wait_for("document.documentElement.dataset.search === 'done'")
    assert (
        browser.evaluate(
            "document.querySelectorAll('#results script, #results img, #results .pill *:not(.sp)').length"
        )
        == 0
    )
    assert browser.evaluate("document.querySelector('#results .res').dataset.token") == "<script>"
    assert dom_texts(browser, "#results .res:first-child .res-h .pill")[0] == "<script>"
    assert browser.evaluate("window.__pwned === undefined")


def test_navigation_between_features(site, browser):
    d = site["dir"]
    browser.goto(f"{(d / 'feature.html').as_uri()}#10", ready="feature:10")
    browser.evaluate("document.body.focus()")
    browser.click("#next")
    browser.wait_for("document.documentElement.dataset.ready === 'feature:11'")
    browser.key("ArrowLeft")  # keyboard: arrows step through features
    browser.wait_for("document.documentElement.dataset.ready === 'feature:10'")
    browser.key("ArrowRight")
    browser.wait_for("document.documentElement.dataset.ready === 'feature:11'")
    t0 = time.perf_counter()
    browser.set_hash("#9000", ready="feature:9000")  # another block: one more script load
    print(f"\nfeature 11 -> 9000 (another block): {(time.perf_counter() - t0) * 1000:.0f} ms")
    assert browser.evaluate("document.title").startswith("Feature 9000")
    assert browser.evaluate("document.getElementById('next').getAttribute('href')") == "#9001"
    browser.set_hash(f"#{N_FEATURES - 1}", ready=f"feature:{N_FEATURES - 1}")
    assert (
        browser.evaluate("document.getElementById('next').getAttribute('aria-disabled')") == "true"
    )
    browser.set_hash("#99999", ready="feature:99999")
    assert "There is no feature 99999" in browser.evaluate(
        "document.getElementById('content').textContent"
    )
    dead = next(i for i, n in enumerate(site["a"].features.column("n_fired").to_pylist()) if n == 0)
    browser.set_hash(f"#{dead}", ready=f"feature:{dead}")
    assert "never fired" in browser.evaluate("document.getElementById('content').textContent")


def test_notebook_view_matches_site(site, browser, tmp_path):
    """render_feature_html draws the same contexts (tokens, highlights, values, max marks), stats,
    histogram and logit tables as the site's feature page."""
    fid = 2
    view = FeatureView(load_feature_record(site["a"], fid), feature_href="feature.html#{id}")
    path = view.save(ARTIFACTS / f"notebook-feature-{fid}.html")
    snapshot = (
        "Array.from(document.querySelectorAll('.glance, .stats, .ctx-v, .tk, svg.hist, table.vals, .card h2, .card h3'))"
        ".filter(e => !e.closest('section') || !/Nearest/.test(e.closest('section').textContent.slice(0, 40)))"
        ".map(t => [t.tagName, t.textContent, t.getAttribute('class'), t.getAttribute('style'), t.getAttribute('title')])"
    )
    browser.goto(path.resolve().as_uri())
    nb = browser.evaluate(snapshot)
    browser.screenshot(ARTIFACTS / f"notebook-feature-{fid}.png", full_page=True, max_height=2000)
    browser.goto(f"{(site['dir'] / 'feature.html').as_uri()}#{fid}", ready=f"feature:{fid}")
    assert browser.evaluate(snapshot) == nb and len(nb) > 100


def test_served_over_http(site, browser):
    with serve(site["dir"]) as srv:
        browser.goto(srv.url, ready="index")
        browser.goto(srv.feature_url(5), ready="feature:5")
        assert browser.evaluate("document.querySelectorAll('.ctx .tk.on').length") > 0
    assert not srv.running


def test_dump_dom_without_devtools(site, chromium):
    """The plain `chromium --dump-dom` path (no DevTools) sees the rendered feature page too."""
    dom = dump_dom(f"{(site['dir'] / 'feature.html').as_uri()}#5", chromium)
    assert 'data-ready="feature:5"' in dom
    n_ctx = len(load_feature_record(site["a"], 5)["examples"])
    assert dom.count('class="tk on mx"') + dom.count('class="tk ws on mx"') == n_ctx


def test_number_formats_match_javascript(site, browser):
    """The notebook view formats numbers exactly as the site's JavaScript does."""
    import numpy as np

    rng = np.random.default_rng(0)
    vals = [
        0.0,
        2.125,
        1234.5,
        99.95,
        0.0009995,
        1e-7,
        123456.0,
        -0.5,
        9.995,
        0.125,
        5e-5,
        12345.0,
        2.5e9,
    ]
    vals += [float(v) for v in np.float32(rng.lognormal(0, 3, 300))]
    vals += [float(v) for v in -np.float32(rng.lognormal(0, 2, 50))]
    vals += [round(float(v), 3) for v in rng.uniform(0, 10, 200)]  # decimal ties
    browser.goto((site["dir"] / "index.html").as_uri(), ready="index")  # loads SAE.fmt & co.
    got = browser.evaluate(
        "(function(vs){ return vs.map(v => [v.toPrecision(3), v.toExponential(2), v.toPrecision(1),"
        " SAE.fmt(v), Math.abs(v) < 1 ? SAE.fmtDensity(Math.abs(v)) : '', SAE.fmtCount(Math.abs(v))]); })("
        + json.dumps(vals)
        + ")"
    )
    want = [
        [
            js_to_precision(v, 3),
            js_to_exponential(v, 2),
            js_to_precision(v, 1),
            fmt(v),
            fmt_density(abs(v)) if abs(v) < 1 else "",
            fmt_count(abs(v)),
        ]
        for v in vals
    ]
    assert got == want


def test_take_screenshots(site, chromium, tmp_path):
    """The helper that makes the README's screenshots (python -m saepipe.dashboard screenshot)."""
    from saepipe.dashboard.screenshots import take_screenshots

    index_png, feature_png = take_screenshots(site["dir"], tmp_path, executable=chromium)
    for p in (index_png, feature_png):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000
    assert feature_png.name.startswith("feature-")
