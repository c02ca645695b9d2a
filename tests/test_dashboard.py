"""The offline feature dashboard (saepipe.dashboard): data contract, site writer, notebook view, server.

Browser tests (headless Chromium) are in test_dashboard_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saepipe.dashboard import (
    ContractError,
    FeatureView,
    build_site,
    load_analysis,
    load_feature_record,
    render_feature_html,
    serve,
)
from saepipe.dashboard.jsdata import dumps, js_call, round_sig
from saepipe.dashboard.render import esc, fmt, visible
from saepipe.dashboard.site import iter_blocks
from saepipe.dashboard.synthetic import HOSTILE_TOKENS, write_synthetic_analysis

SMALL = dict(
    n_features=300, top_n=5, n_quantiles=3, per_quantile=2, window=12, vocab_size=900, seed=1
)


@pytest.fixture(scope="module")
def small_analysis(tmp_path_factory) -> Path:
    return write_synthetic_analysis(tmp_path_factory.mktemp("analysis"), **SMALL)


@pytest.fixture(scope="module")
def small_site(small_analysis, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build_site(small_analysis, out, block_size=64, token_block=128)
    return out


def read_js_call(path: Path) -> list:
    """The JSON arguments of a data file ``SAE.fn(a, b);``."""
    text = path.read_text(encoding="utf-8")
    m = re.fullmatch(r"SAE\.(\w+)\((.*)\);\n", text, flags=re.S)
    assert m, text[:200]
    return json.loads("[" + m.group(2) + "]")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- serialisation ------------------------------------------------------------------------------


def test_round_sig_gives_short_exact_decimals():
    vals = [2.3512001, -0.000123456, 123456.7, 0.1 + 0.2, 1e-12, 0.0, 7.0, np.float32(2.35)]
    got = round_sig(vals, 4)
    assert got == [2.351, -0.0001235, 123500.0, 0.3, 1e-12, 0.0, 7.0, 2.35]
    assert [repr(v) for v in got[:2]] == ["2.351", "-0.0001235"]
    assert round_sig([float("nan"), float("inf"), 1.0]) == [None, None, 1.0]


def test_dumps_is_valid_javascript_text():
    text = dumps({"t": ["\u2028", "</script>", "é", '"', "\n"]})
    assert "\u2028" not in text and "\\u2028" in text
    assert "é" in text  # UTF-8 kept
    assert json.loads(text) == {"t": ["\u2028", "</script>", "é", '"', "\n"]}
    assert js_call("block", 3, {"a": 1}) == 'SAE.block(3,{"a":1});\n'
    with pytest.raises(ValueError):
        dumps(float("nan"))


# --- escaping and display -----------------------------------------------------------------------


def test_visible_shows_control_characters():
    assert visible("\n") == "\u21b5"
    assert visible("a\tb\r") == "a\u21e5b\u240d"
    assert visible("\x00\x1b") == "\u2400\u241b"
    assert visible("") == "\u2205"
    assert visible(" Paris") == " Paris"
    assert visible("\u2028") == "\u21b5"


def test_esc_escapes_markup_and_quotes():
    assert esc("<script>alert('x')</script> & \"q\"") == (
        "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;"
    )


def test_fmt_matches_site_format():
    assert [fmt(v) for v in (0, 2.3512, 123.0, 1234.5, 0.00012, 2e6, 2.125, None)] == [
        "0",
        "2.35",
        "123",
        "1,235",
        "1.20e-4",
        "2.00e6",
        "2.13",
        "\u2013",
    ]  # JavaScript rounds ties up (Math.round, toPrecision); the browser test checks many more


def test_js_number_formatting():
    from saepipe.dashboard.render import js_to_exponential, js_to_precision

    cases = {
        (2.125, 3): "2.13",
        (123456, 3): "1.23e+5",
        (0.5, 1): "0.5",
        (9.5, 1): "1e+1",
        (0.000001, 2): "0.0000010",
        (1e-7, 2): "1.0e-7",
        (1000, 3): "1.00e+3",
        (-0.0123, 2): "-0.012",
        (99.96, 3): "100",
        (0, 3): "0.00",
    }
    assert {k: js_to_precision(*k) for k in cases} == cases
    assert js_to_exponential(1.5, 0) == "2e+0" and js_to_exponential(1234.5678, 2) == "1.23e+3"


class _Collect(HTMLParser):
    """Elements, with classes and attributes, of an HTML snippet; fails on unbalanced tags."""

    VOID = frozenset({"br", "img", "input", "meta", "link", "hr", "line", "rect"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text_by_class: dict[str, list[str]] = {}
        self._open: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if tag not in self.VOID:
            self.stack.append(tag)
            self._open.append((tag, a.get("class", "")))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> in {self.stack[-3:]}"
        self.stack.pop()
        self._open.pop()

    def handle_data(self, data):
        if self._open:
            cls = self._open[-1][1]
            self.text_by_class.setdefault(cls, []).append(data)


def hostile_record() -> dict:
    tokens = [
        " The",
        " capital",
        " of",
        "<script>",
        "&",
        '"',
        "'",
        "\n",
        " Paris",
        " <b>",
        "\t",
        "",
    ]
    acts = [0.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.25, 3.0, 0.0, 0.0, 0.1]
    return {
        "feature": 7,
        "density": 0.0123,
        "n_fired": 4711,
        "mean_act": 0.8,
        "max_act": 3.0,
        "hist_edges": [0.0, 1.0, 2.0, 3.0],
        "hist_counts": [10, 5, 1],
        "promoted_tokens": [" Paris", "</script><script>alert(1)</script>"],
        "promoted_values": [1.5, 0.5],
        "suppressed_tokens": ["&amp;", " 'x'"],
        "suppressed_values": [-0.7, -0.2],
        "neighbors": [3, 12],
        "neighbor_cos": [0.8, 0.4],
        "examples": [
            {
                "feature": 7,
                "kind": "q0",
                "rank": 0,
                "tokens": tokens[:4],
                "acts": [0.0, 0.2, 0.0, 0.0],
                "center": 1,
                "max_act": 0.2,
                "split": "train",
                "doc_id": 3,
            },
            {
                "feature": 7,
                "kind": "top",
                "rank": 0,
                "tokens": tokens,
                "acts": acts,
                "center": 8,
                "max_act": 3.0,
                "split": "eval",
                "doc_id": 42,
            },
        ],
        "summary": {"model": "m<odel>", "site": {"layer": 6, "component": "mlp"}, "quantiles": 1},
    }


def test_render_feature_html_escapes_everything():
    html_text = render_feature_html(hostile_record(), feature_href="feature.html#{id}")
    assert "<script" not in html_text.lower()  # no markup from the data, and the view has no script
    assert "&lt;script&gt;" in html_text and "&lt;/script&gt;&lt;script&gt;alert(1)" in html_text
    assert "<b>" not in html_text and "&lt;b&gt;" in html_text
    assert "m&lt;odel&gt;" in html_text
    p = _Collect()
    p.feed(html_text)
    p.close()
    assert p.stack == [], "unclosed elements"
    tk = [(t, a) for t, a in p.elements if t == "span" and "tk" in a.get("class", "").split()]
    assert len(tk) == 12 + 4
    on = [a for _, a in tk if "on" in a["class"].split()]
    assert len(on) == 5 + 1  # positive activations of both windows
    mx = [a for _, a in tk if "mx" in a["class"].split()]
    assert len(mx) == 2
    assert (
        mx[0]["title"] == '" Paris" · 3' and mx[0]["style"] == "--a:0.9"
    )  # top group renders first
    texts = [d for cls, ds in p.text_by_class.items() if cls.startswith("tk") for d in ds]
    assert "<script>" in texts and "\u21b5" in texts and "\u21e5" in texts and "\u2205" in texts
    assert '<a href="feature.html#3">#3</a>' in html_text
    assert html_text.index("Top activations") < html_text.index("Quantile 1 of 1")


def test_feature_view_repr_and_save(tmp_path):
    view = FeatureView(hostile_record())
    assert view._repr_html_() == view.html == str(view)
    assert repr(view) == "FeatureView(feature=7)"
    path = view.save(tmp_path / "sub" / "f7.html")
    doc = path.read_text(encoding="utf-8")
    assert (
        doc.startswith("<!doctype html>") and view.html in doc and '<meta charset="utf-8">' in doc
    )


def test_render_handles_sparse_records():
    html_text = render_feature_html({"feature": 5})
    assert "Feature 5" in html_text and "No contexts." in html_text
    dead = render_feature_html({"feature": 6, "density": 0.0, "n_fired": 0, "examples": []})
    assert "dead latent" in dead
    # no center / max_act given: the window's argmax is used
    rec = {
        "feature": 1,
        "examples": [{"tokens": ["a", "b", "c"], "acts": np.array([0.1, 2.0, 0.3], np.float32)}],
    }
    assert 'class="tk on mx"' in render_feature_html(rec)


# --- reading the contract -------------------------------------------------------------------------


def test_load_analysis_sorts_and_reads(small_analysis):
    a = load_analysis(small_analysis)
    assert a.n_features == SMALL["n_features"]
    assert a.summary["site"] == {"layer": 6, "component": "mlp"}
    ex = a.examples
    feats = ex.column("feature").to_numpy()
    assert np.all(np.diff(feats) >= 0)
    rec = load_feature_record(a, 0)
    kinds = [e["kind"] for e in rec["examples"]]
    assert kinds[0] == "top" and kinds[-1] == "q0"
    assert kinds.index("q2") < kinds.index("q1") < kinds.index("q0")
    with pytest.raises(KeyError):
        load_feature_record(a, 10**6)


def test_contract_errors(tmp_path, small_analysis):
    with pytest.raises(ContractError, match=r"features\.parquet"):
        load_analysis(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"density": [0.1]}), bad / "features.parquet")
    with pytest.raises(ContractError, match="missing required column"):
        load_analysis(bad)
    # acts and tokens of different lengths
    pq.write_table(pq.read_table(small_analysis / "features.parquet"), bad / "features.parquet")
    ex = pa.table(
        {
            "feature": pa.array([0], pa.int32()),
            "tokens": pa.array([["a", "b"]]),
            "acts": pa.array([[1.0]], pa.list_(pa.float32())),
        }
    )
    pq.write_table(ex, bad / "examples.parquet")
    with pytest.raises(ContractError, match="2 tokens but 1 acts"):
        build_site(bad, tmp_path / "site")


def test_minimal_analysis_builds(tmp_path):
    """Only features.parquet with ids: the site still builds (empty sections, no token search)."""
    src = tmp_path / "a"
    src.mkdir()
    pq.write_table(
        pa.table({"feature": pa.array([0, 1, 5], pa.int64()), "weird_extra": [1, 2, 3]}),
        src / "features.parquet",
    )
    info = build_site(src, tmp_path / "site")
    assert info.n_features == 3 and info.n_blocks == 1 and info.n_token_rows == 0
    (meta,) = read_js_call(tmp_path / "site" / "data" / "meta.js")
    assert meta["site"]["hasTokens"] is False and meta["site"]["nFeatures"] == 6
    assert meta["summary"] == {}
    assert not (tmp_path / "site" / "data" / "tokens.js").exists()


# --- blocks ------------------------------------------------------------------------------------------


def decode_examples(block: dict, f: dict) -> list[tuple[list[str], np.ndarray]]:
    """What common.js's SAE.examples does, in Python."""
    ex = f["ex"]
    tok = np.frombuffer(base64.b64decode(ex["t"]), "<u2" if block["tokWidth"] == 2 else "<u4")
    acts = np.zeros(len(tok), np.float32)
    ai = np.frombuffer(base64.b64decode(ex["ai"]), "<u2" if ex["aiw"] == 2 else "<u4")
    acts[ai] = np.frombuffer(base64.b64decode(ex["av"]), "<f4")
    out, off = [], 0
    for n in ex["len"]:
        out.append(([block["strings"][i] for i in tok[off : off + n]], acts[off : off + n]))
        off += n
    return out


def test_blocks_split_by_id_and_round_trip(small_analysis):
    a = load_analysis(small_analysis)
    blocks = dict(iter_blocks(a, block_size=64))
    assert sorted(blocks) == [0, 1, 2, 3, 4]  # 300 features / 64
    seen = []
    for b, payload in blocks.items():
        ids = [f["id"] for f in payload["features"]]
        assert ids == sorted(ids) and all(b * 64 <= i < (b + 1) * 64 for i in ids)
        seen += ids
    assert seen == list(range(300))
    # every context decodes to exactly the tokens and activations of examples.parquet
    for fid in (0, 1, 77, 299):
        rec = load_feature_record(a, fid)
        f = next(x for x in blocks[fid // 64]["features"] if x["id"] == fid)
        got = decode_examples(blocks[fid // 64], f)
        assert len(got) == len(rec["examples"]) > 0
        for (toks, acts), e in zip(got, rec["examples"], strict=True):
            assert toks == e["tokens"]
            np.testing.assert_array_equal(acts, np.asarray(e["acts"], np.float32))
        assert [blocks[fid // 64]["kinds"][k] for k in f["ex"]["k"]] == [
            e["kind"] for e in rec["examples"]
        ]
        assert f["ex"]["c"] == [e["center"] for e in rec["examples"]]


def test_blocks_skip_missing_ids(tmp_path, small_analysis):
    t = pq.read_table(small_analysis / "features.parquet")
    keep = [i for i in range(300) if not 64 <= i < 128 and i != 5]
    src = tmp_path / "a"
    src.mkdir()
    pq.write_table(t.take(keep), src / "features.parquet")
    blocks = dict(iter_blocks(load_analysis(src), block_size=64))
    assert sorted(blocks) == [0, 2, 3, 4]
    assert 5 not in [f["id"] for f in blocks[0]["features"]]
    with pytest.raises(ValueError):
        next(iter_blocks(load_analysis(src), block_size=0))


# --- the site writer -----------------------------------------------------------------------------


def test_site_layout(small_site):
    names = {str(p.relative_to(small_site)) for p in small_site.rglob("*") if p.is_file()}
    for need in (
        "index.html",
        "feature.html",
        "assets/dashboard.css",
        "assets/common.js",
        "assets/index.js",
        "assets/feature.js",
        "data/meta.js",
        "data/index.js",
        "data/tokens.js",
        "data/features-0000.js",
        "data/features-0004.js",
        "data/tokfeat-0000.js",
    ):
        assert need in names
    (meta,) = read_js_call(small_site / "data" / "meta.js")
    assert meta["site"]["blocks"] == [0, 1, 2, 3, 4] and meta["site"]["blockSize"] == 64
    assert meta["summary"]["some_future_key"] == {"nested": [1, 2, 3]}  # unknown keys pass through
    (index,) = read_js_call(small_site / "data" / "index.js")
    assert index["n"] == 300 and len(index["d"]) == len(index["top"]) == len(index["prom"]) == 300
    (tokens,) = read_js_call(small_site / "data" / "tokens.js")
    assert " Paris" in tokens["tok"]
    row = tokens["tok"].index(" Paris")
    b, feats = read_js_call(small_site / "data" / f"tokfeat-{row // 128:04d}.js")
    assert b == row // 128
    assert {0, 1, 2} <= set(feats["f"][row % 128])  # the synthetic Paris features
    for tok in HOSTILE_TOKENS:
        assert tok in tokens["tok"]


def test_site_has_no_network_references(small_site):
    """Works offline from file://: no CDN, no fetch/XHR, no absolute URLs."""
    for p in [
        small_site / "index.html",
        small_site / "feature.html",
        *(small_site / "assets").iterdir(),
    ]:
        text = p.read_text(encoding="utf-8").replace("http://www.w3.org/2000/svg", "")
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # comments may name what the code avoids
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, p
        assert "fetch(" not in text and "XMLHttpRequest" not in text, p
        assert "innerHTML" not in text, p


def test_writer_is_deterministic(small_analysis, small_site, tmp_path):
    """Same input, byte-identical output (DVC caches it), whatever the input's row order."""
    again = tmp_path / "again"
    build_site(small_analysis, again, block_size=64, token_block=128)
    assert tree_digest(again) == tree_digest(small_site)
    # shuffled rows in every parquet file: still the same bytes
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    rng = np.random.default_rng(5)
    for name in ("features.parquet", "examples.parquet", "token_features.parquet"):
        t = pq.read_table(small_analysis / name)
        pq.write_table(t.take(rng.permutation(t.num_rows)), shuffled / name, row_group_size=97)
    (shuffled / "summary.json").write_bytes((small_analysis / "summary.json").read_bytes())
    out3 = tmp_path / "site3"
    build_site(shuffled, out3, block_size=64, token_block=128)
    assert tree_digest(out3) == tree_digest(small_site)
    # a rebuild into a used folder removes stale data files
    build_site(small_analysis, out3, block_size=128, token_block=128)
    assert not (out3 / "data" / "features-0004.js").exists()


def test_cli_build(small_analysis, tmp_path, capsys):
    from saepipe.dashboard.__main__ import main

    assert main(["build", str(small_analysis), str(tmp_path / "s")]) == 0
    assert "300 features" in capsys.readouterr().out
    assert (tmp_path / "s" / "index.html").is_file()


# --- the server -----------------------------------------------------------------------------------


def test_serve_on_loopback_and_stop(small_site):
    with serve(small_site) as srv:
        assert srv.host == "127.0.0.1" and srv._httpd.server_address[0] == "127.0.0.1"
        assert srv.url == f"http://127.0.0.1:{srv.port}/" and srv.port > 0
        with urllib.request.urlopen(srv.url, timeout=10) as r:
            assert r.status == 200 and b"<title>" in r.read()
        with urllib.request.urlopen(srv.url + "data/meta.js", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
            assert r.headers["Cache-Control"] == "no-cache"
        for bad in ("data/", "../" * 5 + "etc/passwd", "nope.html"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(srv.url + bad, timeout=10)
            assert e.value.code == 404
        assert srv.running and "127.0.0.1" in srv._repr_html_()
        assert srv.feature_url(3).endswith("/feature.html#3")
    assert not srv.running
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url, timeout=2)
    srv.stop()  # idempotent


def test_serve_needs_a_site(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the site"):
        serve(tmp_path)
