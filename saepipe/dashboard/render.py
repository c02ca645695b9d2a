"""One feature as a self-contained HTML snippet (for notebooks), with the site's look.

``render_feature_html(record)`` returns a ``<div>`` with its own ``<style>`` (every rule scoped under
``.saed``, so the host page is untouched) and no script: hover titles carry the activations, so it
renders the same in Jupyter, VS Code, a saved file or a sanitising viewer. The markup mirrors what
``assets/common.js`` builds on the site's feature page (same classes, same colour formula).

A *record* is a mapping with the ``features.parquet`` columns of one latent (all optional except
``feature``) and ``examples``: a list of mappings with the ``examples.parquet`` columns (``tokens``
and ``acts`` required; ``kind`` defaults to "top"; ``center`` and ``max_act`` default to the window's
argmax). :func:`saepipe.dashboard.load_feature_record` reads one from an analysis folder.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

_CTRL = {
    "\n": "\u21b5",
    "\r": "\u240d",
    "\t": "\u21e5",
    "\u2028": "\u21b5",
    "\u2029": "\u00b6",
    "\x7f": "\u2421",
}
_CTRL_RE = re.compile("[\x00-\x1f\x7f\u2028\u2029]")
_BLANK_RE = re.compile("^[\\s\x00-\x1f\x7f\u2028\u2029]*$")


def visible(token: str) -> str:
    """A token as displayed: control characters become visible symbols (newline -> ↵, tab -> ⇥,
    other C0 controls -> their U+24xx picture); the empty token is ∅. Spaces are kept."""
    if token == "":
        return "\u2205"
    return _CTRL_RE.sub(lambda m: _CTRL.get(m.group(0)) or chr(0x2400 + ord(m.group(0))), token)


def esc(text: Any) -> str:
    """HTML-escape text for element content and quoted attribute values (&, <, >, " and ')."""
    return html.escape(str(text), quote=True)


def quoted(token: str) -> str:
    """A token in JSON quotes, as the site's titles show it (``" Paris"``, ``"\\n"``)."""
    return json.dumps(token, ensure_ascii=False)


def _js_digits(x: float, p: int) -> tuple[str, str, int]:
    """(sign, p significant digits, decimal exponent) of ``x`` rounded as JavaScript's toPrecision
    does: from the exact binary value, ties away from zero (Python's format rounds ties to even)."""
    d = Decimal(x)
    sign = "-" if d < 0 else ""
    d = abs(d)
    if d == 0:
        return sign, "0" * p, 0
    e = d.adjusted()
    n = int(d.scaleb(p - 1 - e).to_integral_value(rounding=ROUND_HALF_UP))
    if n >= 10**p:  # 9.995 -> 10.0
        n //= 10
        e += 1
    return sign, str(n), e


def js_to_precision(x: float, p: int) -> str:
    """``Number.prototype.toPrecision(p)``."""
    sign, digits, e = _js_digits(x, p)
    if e < -6 or e >= p:
        return (
            f"{sign}{digits[0]}{'.' + digits[1:] if p > 1 else ''}e{'+' if e >= 0 else '-'}{abs(e)}"
        )
    if e >= 0:
        whole, frac = digits[: e + 1], digits[e + 1 :]
        return f"{sign}{whole}{'.' + frac if frac else ''}"
    return f"{sign}0.{'0' * (-e - 1)}{digits}"


def js_to_exponential(x: float, f: int) -> str:
    """``Number.prototype.toExponential(f)``."""
    sign, digits, e = _js_digits(x, f + 1)
    return f"{sign}{digits[0]}{'.' + digits[1:] if f else ''}e{'+' if e >= 0 else '-'}{abs(e)}"


def _js_number(s: str) -> str:
    """``String(Number(s))`` for values in [1e-6, 1e21) (shortest round-trip decimal, no '.0')."""
    r = repr(float(s))
    return r[:-2] if r.endswith(".0") else r


def _js_round(v: float) -> int:
    return math.floor(v + 0.5)  # Math.round: ties toward +infinity


def fmt(v: Any) -> str:
    """A number exactly as the site's ``SAE.fmt`` writes it (3 significant digits, exponent when
    tiny or huge)."""
    if v is None:
        return "\u2013"
    v = float(v)
    if math.isnan(v):
        return "\u2013"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return js_to_exponential(v, 2).replace("e+", "e")
    if a >= 1000:
        return f"{_js_round(v):,}"
    return _js_number(js_to_precision(v, 3))


def fmt_int(v: Any) -> str:
    return "\u2013" if v is None else f"{_js_round(float(v)):,}"


def fmt_density(d: Any) -> str:
    """As ``SAE.fmtDensity``: a percentage, or an exponent below 1e-4."""
    if d is None:
        return "\u2013"
    d = float(d)
    if math.isnan(d):
        return "\u2013"
    if d == 0:
        return "0"
    if d >= 1e-4:
        return _js_number(js_to_precision(d * 100, 3)) + "%"
    return js_to_exponential(d, 1)


def fmt_count(n: Any) -> str:
    """As ``SAE.fmtCount``: 12.3k, 4.56M."""
    if n is None:
        return "\u2013"
    n = float(n)
    if n >= 1e9:
        return js_to_precision(n / 1e9, 3) + "B"
    if n >= 1e6:
        return js_to_precision(n / 1e6, 3) + "M"
    if n >= 1e4:
        return js_to_precision(n / 1e3, 3) + "k"
    return fmt_int(n)


def alpha(act: float, scale: float) -> float:
    """Background alpha of a token (same formula as ``SAE.alpha`` in common.js)."""
    if not act > 0:
        return 0.0
    r = min(1.0, act / scale) if scale > 0 else 1.0
    return math.floor((0.12 + 0.78 * r) * 100 + 0.5) / 100


def component_css() -> str:
    """The component stylesheet shared with the site (every rule under ``.saed``)."""
    return (
        resources.files("saepipe.dashboard").joinpath("static", "components.css").read_text("utf-8")
    )


def _pill(token: str, cls: str = "", extra_title: str = "") -> str:
    text = visible(token)
    parts = re.split("( +)", text)
    inner = "".join(
        f'<span class="sp">{chr(0x2423) * len(p)}</span>' if p.startswith(" ") else esc(p)
        for p in parts
        if p
    )
    title = quoted(token) + (f" \u00b7 {extra_title}" if extra_title else "")
    return f'<span class="pill{(" " + cls) if cls else ""}" title="{esc(title)}">{inner}</span>'


def _context_row(
    tokens: Sequence[str],
    acts: Sequence[float],
    center: int,
    max_act: float,
    scale: float,
    meta: str,
) -> str:
    out = [
        f'<div class="ctx"><span class="ctx-v" title="{esc("activation of the marked token " + fmt(max_act) + (" · " + meta if meta else ""))}">'
        f'{esc(fmt(max_act))}</span><span class="ctx-t">'
    ]
    for i, tok in enumerate(tokens):
        act = float(acts[i]) if i < len(acts) else 0.0
        if not math.isfinite(act):
            act = 0.0
        cls = "tk"
        if _BLANK_RE.match(tok):
            cls += " ws"
        attrs = ""
        if act > 0:
            cls += " on"
            attrs = (
                f' style="--a:{alpha(act, scale)!r}" title="{esc(quoted(tok) + " · " + fmt(act))}"'
                f' data-act="{esc(repr(float(act)))}"'
            )
        if i == center:
            cls += " mx"
        out.append(f'<span class="{cls}"{attrs}>{esc(visible(tok))}</span>')
    out.append("</span></div>")
    return "".join(out)


def _ticks(lo: float, hi: float, n: int) -> list[float]:
    if not hi > lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    err = ((hi - lo) / n) / step
    if err >= 7.5:
        step *= 10
    elif err >= 3.5:
        step *= 5
    elif err >= 1.5:
        step *= 2
    out, v = [], math.ceil(lo / step) * step
    while v <= hi + step * 1e-9:
        out.append(round(v / step) * step)
        v += step
    return out


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def histogram_svg(
    edges: Sequence[float],
    counts: Sequence[int],
    *,
    width: int = 320,
    height: int = 150,
    label: str = "Activation histogram",
) -> str:
    """The site's activation histogram (``SAE.actHistogram``) as an SVG string."""
    W, H, ml, mr, mt, mb = width, height, 34, 8, 8, 22
    x0, x1 = float(edges[0]), float(edges[-1])
    ymax = max(1, max(int(c) for c in counts))
    pw, ph = W - ml - mr, H - mt - mb

    def X(v: float) -> float:
        return ml + ((v - x0) / (x1 - x0) if x1 > x0 else 0) * pw

    def Y(v: float) -> float:
        return mt + ph - (v / ymax) * ph

    parts = [
        f'<svg class="hist" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(label)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for t in _ticks(0, ymax, 3):
        if t == 0:
            continue
        parts.append(
            f'<line class="grid" x1="{ml}" x2="{W - mr}" y1="{_num(Y(t))}" y2="{_num(Y(t))}"/>'
        )
        parts.append(
            f'<text x="{ml - 5}" y="{_num(Y(t) + 3.5)}" text-anchor="end">{esc(fmt_count(t))}</text>'
        )
    for i, n in enumerate(counts):
        xa, xb = X(float(edges[i])), X(float(edges[i + 1]))
        w = max(0.8, xb - xa - (1 if xb - xa > 3 else 0))
        hgt = max(1.0, (int(n) / ymax) * ph) if int(n) > 0 else 0.0
        title = f"{fmt(edges[i])} \u2013 {fmt(edges[i + 1])}: {fmt_int(n)} tokens"
        parts.append(
            f'<g><title>{esc(title)}</title><rect class="bh" x="{_num(xa)}" y="{mt}" width="{_num(max(w, 1))}" height="{ph}"/>'
            f'<rect class="b" x="{_num(xa)}" y="{_num(mt + ph - hgt)}" width="{_num(w)}" height="{_num(hgt)}"/></g>'
        )
    parts.append(
        f'<line class="ax" x1="{ml}" x2="{W - mr}" y1="{_num(mt + ph + 0.5)}" y2="{_num(mt + ph + 0.5)}"/>'
    )
    for t in _ticks(x0, x1, 4):
        x = X(t)
        parts.append(
            f'<line class="ax" x1="{_num(x)}" x2="{_num(x)}" y1="{mt + ph}" y2="{mt + ph + 4}"/>'
        )
        parts.append(f'<text x="{_num(x)}" y="{H - 6}" text-anchor="middle">{esc(fmt(t))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _value_table(tokens: Sequence[str], values: Sequence[float], sign: str) -> str:
    if not tokens:
        return '<p class="empty">none</p>'
    vals = [float(v) if v is not None else 0.0 for v in values]
    amax = max((abs(v) for v in vals), default=0.0) or 1.0
    rows = []
    for tok, v in zip(tokens, vals, strict=False):
        pct = round(abs(v) / amax * 100)
        rows.append(
            f'<tr><td>{_pill(tok, sign)}</td><td class="bar"><div class="bar-track"><div class="bar-fill {sign}" '
            f'style="width:{pct}%"></div></div></td><td class="v">{"+" if v > 0 else ""}{esc(fmt(v))}</td></tr>'
        )
    return f'<table class="vals"><tbody>{"".join(rows)}</tbody></table>'


def _neighbours(ids: Sequence[int], cos: Sequence[float], href: str | None) -> str:
    if not ids:
        return '<p class="empty">none</p>'
    rows = []
    for i, fid in enumerate(ids):
        c = float(cos[i]) if i < len(cos) and cos[i] is not None else None
        label = f"#{int(fid)}"
        link = (
            f'<a href="{esc(href.format(id=int(fid)))}">{label}</a>'
            if href
            else f"<span>{label}</span>"
        )
        width = round(max(0.0, min(1.0, c or 0.0)) * 100)
        rows.append(
            f'<tr><td>{link}</td><td class="bar"><div class="bar-track"><div class="bar-fill cos" style="width:{width}%">'
            f'</div></div></td><td class="v">{"" if c is None else esc(fmt(c))}</td></tr>'
        )
    return f'<table class="vals"><tbody>{"".join(rows)}</tbody></table>'


def _kind_label(kind: str, nq: int | None) -> str:
    if kind == "top":
        return "Top activations"
    m = re.fullmatch(r"q(\d+)", kind)
    if m:
        q = int(m.group(1))
        if nq:
            extra = " (highest)" if q == nq - 1 else " (lowest)" if q == 0 else ""
            return f"Quantile {q + 1} of {nq}{extra}"
        return f"Quantile {q}"
    return kind


def _card(title: str, body: str, count: str | None = None) -> str:
    c = f'<span class="count"> \u00b7 {esc(count)}</span>' if count else ""
    return f'<section class="card"><h2>{esc(title)}{c}</h2>{body}</section>'


def _list(v: Any) -> list[Any]:
    if v is None:
        return []
    if hasattr(v, "tolist"):
        v = v.tolist()
    return list(v)


def _float(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _examples(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    # data.py loads pyarrow: only when rendering examples
    from saepipe.dashboard.data import kind_order_key

    out = []
    for i, e in enumerate(record.get("examples") or []):
        tokens = [("" if t is None else str(t)) for t in _list(e.get("tokens"))]
        acts = [(_float(a) or 0.0) for a in _list(e.get("acts"))]
        acts = (acts + [0.0] * len(tokens))[: len(tokens)]
        center = e.get("center")
        if center is None or not 0 <= int(center) < len(tokens):
            center = max(range(len(tokens)), key=lambda j: acts[j]) if tokens else 0
        mx = _float(e.get("max_act"))
        if mx is None:
            mx = acts[int(center)] if tokens else 0.0
        out.append(
            {
                "kind": str(e.get("kind") or "top"),
                "rank": int(e.get("rank") or 0),
                "i": i,
                "tokens": tokens,
                "acts": acts,
                "center": int(center),
                "max": mx,
                "split": e.get("split"),
                "doc": e.get("doc_id"),
            }
        )
    out.sort(key=lambda e: (kind_order_key(e["kind"]), e["rank"], e["i"]))
    return out


def render_feature_html(
    record: Mapping[str, Any],
    *,
    feature_href: str | None = None,
    subtitle: str | None = None,
    include_style: bool = True,
) -> str:
    """A self-contained HTML snippet for one latent (see the module docstring for ``record``).

    ``feature_href``: a format string for links to other latents (e.g. ``"feature.html#{id}"``);
    without it, nearest features are plain text. ``subtitle`` defaults to the record's
    ``summary`` model and site.
    """
    fid = int(record["feature"])
    summary = record.get("summary") or {}
    if subtitle is None:
        bits = []
        if summary.get("model"):
            bits.append(str(summary["model"]))
        site = summary.get("site") or {}
        if isinstance(site, Mapping) and (site.get("layer") is not None or site.get("component")):
            bits.append(
                f"layer {site.get('layer', '?')}"
                + (f" {site['component']}" if site.get("component") else "")
            )
        subtitle = " \u00b7 ".join(bits)
    dens, n = _float(record.get("density")), record.get("n_fired")
    mean, mx = _float(record.get("mean_act")), _float(record.get("max_act"))
    examples = _examples(record)

    def stat(label: str, value: str, small: str | None = None) -> str:
        s = f"<small>{esc(small)}</small>" if small else ""
        return f'<div class="stat"><dt>{esc(label)}</dt><dd>{esc(value)}{s}</dd></div>'

    one_in = f"1 in {fmt_count(_js_round(1 / dens))}" if dens else None
    parts = [f'<div class="saed saed-nb" data-feature="{fid}">']
    if include_style:
        parts.append(f"<style>{component_css()}</style>")
    parts.append(f'<div class="nb-head"><h2>Feature {fid}</h2>')
    if subtitle:
        parts.append(f'<span class="muted">{esc(subtitle)}</span>')
    parts.append("</div>")
    glance = []
    top_tokens: list[str] = []
    for e in examples:
        if e["kind"] == "top" and e["tokens"]:
            t = e["tokens"][e["center"]]
            if t not in top_tokens and len(top_tokens) < 3:
                top_tokens.append(t)
    if top_tokens:
        glance.append(
            '<span class="muted">Fires most on</span>'
            + "".join(_pill(t, "act") for t in top_tokens)
        )
    promoted = _list(record.get("promoted_tokens"))
    if promoted:
        label = (
            '<span class="muted gap">\u00b7 promotes</span>'
            if glance
            else '<span class="muted">Promotes</span>'
        )
        glance.append(label + "".join(_pill(str(t), "pos") for t in promoted[:3]))
    if glance:
        parts.append(f'<p class="glance">{"".join(glance)}</p>')
    parts.append(
        '<dl class="stats">'
        + stat("Density", fmt_density(dens), one_in)
        + stat("Fires on", fmt_int(n), "tokens")
        + stat("Mean activation", fmt(mean))
        + stat("Max activation", fmt(mx))
        + "</dl>"
    )
    if n == 0 or (dens == 0 and not examples):
        parts.append(
            '<p class="empty">This latent never fired on the analyzed tokens (a dead latent): it has no contexts.</p>'
        )
    edges, counts = _list(record.get("hist_edges")), _list(record.get("hist_counts"))
    side = []
    if counts and len(edges) == len(counts) + 1:
        hist = histogram_svg(edges, counts) + (
            '<p class="legend">Histogram of this latent\u2019s activation over the tokens where it fires.</p>'
        )
    else:
        hist = '<p class="empty">No histogram.</p>'
    side.append(_card("Activations", hist, f"{fmt_int(n)} tokens" if n else None))
    side.append(
        _card(
            "Promoted tokens",
            _value_table(
                _list(record.get("promoted_tokens")), _list(record.get("promoted_values")), "pos"
            ),
        )
    )
    side.append(
        _card(
            "Suppressed tokens",
            _value_table(
                _list(record.get("suppressed_tokens")),
                _list(record.get("suppressed_values")),
                "neg",
            ),
        )
    )
    side.append(
        _card(
            "Nearest features",
            _neighbours(
                _list(record.get("neighbors")), _list(record.get("neighbor_cos")), feature_href
            ),
            "decoder cosine",
        )
    )

    scale = mx if mx and mx > 0 else max([0.0, *(e["max"] for e in examples)])

    def rows(items: list[dict[str, Any]]) -> str:
        out = []
        for e in items:
            meta = " \u00b7 ".join(
                x
                for x in [
                    e["split"] or None,
                    f"doc {e['doc']}" if e["doc"] is not None and e["doc"] >= 0 else None,
                ]
                if x
            )
            out.append(_context_row(e["tokens"], e["acts"], e["center"], e["max"], scale, meta))
        return f'<div class="ctxs">{"".join(out)}</div>'

    groups: list[tuple[str, list[dict[str, Any]]]] = []
    for e in examples:
        if not groups or groups[-1][0] != e["kind"]:
            groups.append((e["kind"], []))
        groups[-1][1].append(e)
    top = [g for g in groups if g[0] == "top"]
    rest = [g for g in groups if g[0] != "top"]
    # Number of quantiles: summary["quantiles"] when it is a count, else one past the highest q<i>.
    q = summary.get("quantiles")
    qs = [int(m.group(1)) for m in (re.fullmatch(r"q(\d+)", k) for k, _ in rest) if m]
    nq = q if isinstance(q, int) and not isinstance(q, bool) else (max(qs) + 1 if qs else None)
    main = [
        _card(
            "Top activations",
            rows(top[0][1]) if top else '<p class="empty">No contexts.</p>',
            f"{len(top[0][1])} contexts" if top else None,
        )
    ]
    if rest:
        body = []
        for kind, items in rest:
            mxs = [e["max"] for e in items]
            body.append(
                f'<h3>{esc(_kind_label(kind, nq))}<span class="range">marked-token activation {esc(fmt(min(mxs)))} \u2013 '
                f"{esc(fmt(max(mxs)))}</span></h3>{rows(items)}"
            )
        main.append(
            _card("Samples across the activation range", "".join(body), f"{len(rest)} intervals")
        )
    parts.append(
        f'<div class="fgrid"><div class="side">{"".join(side)}</div><div class="examples">{"".join(main)}</div></div>'
    )
    parts.append("</div>")
    return "".join(parts)


class FeatureView:
    """One latent's HTML view: shows itself in a notebook (``_repr_html_``) and saves to a file."""

    def __init__(self, record: Mapping[str, Any], **options: Any):
        self.record = record
        self.feature = int(record["feature"])
        self.html = render_feature_html(record, **options)

    @classmethod
    def from_analysis(cls, analysis_dir: str | Path, feature: int, **options: Any) -> FeatureView:
        # pyarrow, only to read an analysis folder
        from saepipe.dashboard.data import load_feature_record

        return cls(load_feature_record(analysis_dir, feature), **options)

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"FeatureView(feature={self.feature})"

    def document(self) -> str:
        """A complete HTML page holding the view."""
        return (
            '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>Feature {self.feature}</title>\n</head>\n"
            f'<body style="margin:0;padding:16px;background:#f5f6f8">\n{self.html}\n</body>\n</html>\n'
        )

    def save(self, path: str | Path) -> Path:
        """Write :meth:`document` to ``path`` (UTF-8); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.document(), encoding="utf-8")
        return p
