/* saepipe dashboard: the data registry, loaders and the components shared by both pages.
   Data files are plain scripts (they work from file://, where fetch() of local files is blocked),
   each one call into this registry: SAE.block(3, {...}). All text reaches the DOM through
   textContent or attributes, never through innerHTML. */
(function () {
  'use strict';
  var SAE = (window.SAE = window.SAE || {});
  SAE.blocks = {};
  SAE.tokenBlocks = {};
  SAE.setMeta = function (m) { SAE.meta = m; };
  SAE.setIndex = function (x) { SAE.index = x; };
  SAE.setTokens = function (x) { SAE.tokens = x; };
  SAE.block = function (b, payload) { SAE.blocks[b] = payload; };
  SAE.tokenBlock = function (b, payload) { SAE.tokenBlocks[b] = payload; };

  function pad4(n) { return String(n).padStart(4, '0'); }
  SAE.pad4 = pad4;

  var pending = {};
  /* Load a data script once; resolves when it has run. */
  SAE.loadScript = function (src) {
    if (pending[src]) return pending[src];
    pending[src] = new Promise(function (resolve, reject) {
      var s = document.createElement('script');
      s.src = src;
      s.charset = 'utf-8';
      s.onload = function () { resolve(); };
      s.onerror = function () { delete pending[src]; reject(new Error('could not load ' + src)); };
      document.head.appendChild(s);
    });
    return pending[src];
  };
  SAE.siteInfo = function () { return (SAE.meta && SAE.meta.site) || {}; };
  SAE.summary = function () { return (SAE.meta && SAE.meta.summary) || {}; };
  SAE.blockOf = function (id) { return Math.floor(id / (SAE.siteInfo().blockSize || 64)); };
  SAE.hasBlock = function (b) { return (SAE.siteInfo().blocks || []).indexOf(b) >= 0; };
  /* The block holding latent `id`, or null when no file has it. */
  SAE.loadBlock = function (b) {
    if (SAE.blocks[b]) return Promise.resolve(SAE.blocks[b]);
    if (!SAE.hasBlock(b)) return Promise.resolve(null);
    return SAE.loadScript('data/features-' + pad4(b) + '.js').then(function () { return SAE.blocks[b] || null; });
  };
  SAE.featureFrom = function (block, id) {
    if (!block) return null;
    if (!block._byId) {
      block._byId = {};
      block.features.forEach(function (f) { block._byId[f.id] = f; });
    }
    return block._byId[id] || null;
  };
  SAE.loadTokens = function () {
    if (SAE.tokens) return Promise.resolve(SAE.tokens);
    if (!SAE.siteInfo().hasTokens) return Promise.resolve(null);
    return SAE.loadScript('data/tokens.js').then(function () { return SAE.tokens || null; });
  };
  SAE.loadTokenBlock = function (b) {
    if (SAE.tokenBlocks[b]) return Promise.resolve(SAE.tokenBlocks[b]);
    return SAE.loadScript('data/tokfeat-' + pad4(b) + '.js').then(function () { return SAE.tokenBlocks[b]; });
  };

  /* ---- formatting ---------------------------------------------------------------------- */
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return '–';
    if (v === 0) return '0';
    var a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2).replace('e+', 'e');
    if (a >= 1000) return Math.round(v).toLocaleString('en-US');
    return String(Number(v.toPrecision(3)));
  }
  function fmtInt(v) {
    return v === null || v === undefined ? '–' : Math.round(v).toLocaleString('en-US');
  }
  function fmtDensity(d) {
    if (d === null || d === undefined || Number.isNaN(d)) return '–';
    if (d === 0) return '0';
    if (d >= 1e-4) return String(Number((d * 100).toPrecision(3))) + '%';
    return d.toExponential(1);
  }
  function fmtCount(n) {
    if (n === null || n === undefined) return '–';
    if (n >= 1e9) return (n / 1e9).toPrecision(3) + 'B';
    if (n >= 1e6) return (n / 1e6).toPrecision(3) + 'M';
    if (n >= 1e4) return (n / 1e3).toPrecision(3) + 'k';
    return fmtInt(n);
  }
  SAE.fmt = fmt; SAE.fmtInt = fmtInt; SAE.fmtDensity = fmtDensity; SAE.fmtCount = fmtCount;

  /* Tokens shown as text: control characters become visible symbols (newline -> ↵). */
  var CTRL = { '\n': '\u21b5', '\r': '\u240d', '\t': '\u21e5', '\u2028': '\u21b5', '\u2029': '\u00b6', '\x7f': '\u2421' };
  function visible(s) {
    if (s === '') return '\u2205';
    return s.replace(/[\x00-\x1f\x7f\u2028\u2029]/g, function (c) {
      return CTRL[c] || String.fromCharCode(0x2400 + c.charCodeAt(0));
    });
  }
  SAE.visible = visible;
  function isBlank(s) { return /^[\s\x00-\x1f\x7f\u2028\u2029]*$/.test(s); }
  SAE.isBlank = isBlank;
  /* A token in quotes, for titles: JSON escapes keep newlines and quotes readable. */
  function quoted(s) { return JSON.stringify(s); }
  SAE.quoted = quoted;

  /* ---- DOM helpers ---------------------------------------------------------------------- */
  function h(tag, attrs, children) {
    var e = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (!Object.prototype.hasOwnProperty.call(attrs, k)) continue;
        var v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === 'class') e.className = v;
        else if (k === 'text') e.textContent = v;
        else if (k === 'style') e.setAttribute('style', v);
        else if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v === true ? '' : String(v));
      }
    }
    if (children) append(e, children);
    return e;
  }
  function append(e, children) {
    (Array.isArray(children) ? children : [children]).forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      e.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
    });
    return e;
  }
  SAE.h = h; SAE.append = append;
  var SVGNS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) {
      if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), attrs[k]);
      else e.setAttribute(k, String(attrs[k]));
    }
    if (text !== undefined) e.textContent = text;
    return e;
  }
  SAE.svg = s;

  /* A token pill: monospace, spaces shown as ␣, the exact string in the title. */
  function pill(tok, cls, extraTitle) {
    var e = h('span', { class: 'pill' + (cls ? ' ' + cls : ''), title: quoted(tok) + (extraTitle ? ' · ' + extraTitle : '') });
    var text = visible(tok);
    var parts = text.split(/( +)/);
    parts.forEach(function (p) {
      if (!p) return;
      if (p[0] === ' ') e.appendChild(h('span', { class: 'sp', text: '\u2423'.repeat(p.length) }));
      else e.appendChild(document.createTextNode(p));
    });
    return e;
  }
  SAE.pill = pill;

  function featureHref(id) { return 'feature.html#' + id; }
  SAE.featureHref = featureHref;

  /* ---- binary columns (base64 of little-endian arrays) -------------------------------------- */
  var LITTLE = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
  function decode(b64, Type) {
    var bin = atob(b64 || '');
    var n = bin.length;
    var u8 = new Uint8Array(n);
    for (var i = 0; i < n; i++) u8[i] = bin.charCodeAt(i);
    if (!LITTLE && Type.BYTES_PER_ELEMENT > 1) {
      var dv = new DataView(u8.buffer), out = new Type(n / Type.BYTES_PER_ELEMENT), w = Type.BYTES_PER_ELEMENT;
      for (var j = 0; j < out.length; j++) {
        out[j] = Type === Float32Array ? dv.getFloat32(j * w, true) : w === 2 ? dv.getUint16(j * w, true) : dv.getUint32(j * w, true);
      }
      return out;
    }
    return new Type(u8.buffer);
  }
  SAE.decode = decode;

  /* The example windows of one latent: [{kind, rank, split, doc, center, max, tokens, acts}]. */
  SAE.examples = function (block, f) {
    var ex = f.ex;
    if (!ex) return [];
    var tok = decode(ex.t, block.tokWidth === 4 ? Uint32Array : Uint16Array);
    var acts = new Float32Array(tok.length);
    var ai = decode(ex.ai, ex.aiw === 4 ? Uint32Array : Uint16Array);
    var av = decode(ex.av, Float32Array);
    for (var i = 0; i < ai.length; i++) acts[ai[i]] = av[i];
    var out = [], off = 0;
    for (var r = 0; r < ex.len.length; r++) {
      var n = ex.len[r], toks = new Array(n);
      for (var j = 0; j < n; j++) toks[j] = block.strings[tok[off + j]];
      out.push({
        kind: block.kinds[ex.k[r]], rank: ex.r[r], split: block.splits[ex.s[r]], doc: ex.doc[r],
        center: ex.c[r], max: ex.m[r], tokens: toks, acts: acts.subarray(off, off + n),
      });
      off += n;
    }
    return out;
  };

  /* ---- components ------------------------------------------------------------------------ */
  /* Background alpha of a token with activation `act` on a latent whose largest activation is `scale`
     (render.py uses the same formula). */
  function alpha(act, scale) {
    if (!(act > 0)) return 0;
    var r = scale > 0 ? Math.min(1, act / scale) : 1;
    return Math.round((0.12 + 0.78 * r) * 100) / 100;
  }
  SAE.alpha = alpha;

  /* One context window as a row: the window's max, then its tokens highlighted by activation. */
  SAE.contextRow = function (e, scale) {
    var meta = [e.split, e.doc >= 0 ? 'doc ' + e.doc : null].filter(Boolean).join(' · ');
    var row = h('div', { class: 'ctx' });
    row.appendChild(h('span', { class: 'ctx-v', title: 'activation of the marked token ' + fmt(e.max) + (meta ? ' · ' + meta : ''), text: fmt(e.max) }));
    var t = h('span', { class: 'ctx-t' });
    for (var i = 0; i < e.tokens.length; i++) {
      var tok = e.tokens[i], act = e.acts[i];
      var cls = 'tk';
      if (isBlank(tok)) cls += ' ws';
      var span = document.createElement('span');
      if (act > 0) {
        cls += ' on';
        span.setAttribute('style', '--a:' + alpha(act, scale));
        span.title = quoted(tok) + ' \u00b7 ' + fmt(act);
        span.setAttribute('data-act', String(act));
      }
      if (i === e.center) cls += ' mx';
      span.className = cls;
      span.textContent = visible(tok);
      t.appendChild(span);
    }
    row.appendChild(t);
    return row;
  };

  function kindLabel(kind, nq) {
    if (kind === 'top') return 'Top activations';
    var m = /^q(\d+)$/.exec(kind);
    if (m) {
      var q = +m[1];
      if (nq) return 'Quantile ' + (q + 1) + ' of ' + nq + (q === nq - 1 ? ' (highest)' : q === 0 ? ' (lowest)' : '');
      return 'Quantile ' + q;
    }
    return kind;
  }
  SAE.kindLabel = kindLabel;

  /* Nice axis ticks between lo and hi. */
  function ticks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = ((hi - lo) / n) / step;
    if (err >= 7.5) step *= 10; else if (err >= 3.5) step *= 5; else if (err >= 1.5) step *= 2;
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.round(v / step) * step);
    return out;
  }
  SAE.ticks = ticks;

  /* A bar histogram as inline SVG. bars: [{x0, x1, n, title, cls, onclick}] on a linear x axis;
     xTicks: [{v, label}]. */
  SAE.barChart = function (opts) {
    var W = opts.width || 320, H = opts.height || 140, ml = opts.ml || 34, mr = 8, mt = 8, mb = 22;
    var bars = opts.bars, x0 = opts.xmin, x1 = opts.xmax;
    var ymax = Math.max(1, Math.max.apply(null, bars.map(function (b) { return b.n; })));
    var svg = s('svg', { class: 'hist', viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': opts.label || 'histogram' });
    var pw = W - ml - mr, ph = H - mt - mb;
    function X(v) { return ml + (x1 > x0 ? (v - x0) / (x1 - x0) : 0) * pw; }
    function Y(v) { return mt + ph - (v / ymax) * ph; }
    ticks(0, ymax, 3).forEach(function (t) {
      if (t === 0) return;
      svg.appendChild(s('line', { class: 'grid', x1: ml, x2: W - mr, y1: Y(t), y2: Y(t) }));
      svg.appendChild(s('text', { x: ml - 5, y: Y(t) + 3.5, 'text-anchor': 'end' }, fmtCount(t)));
    });
    bars.forEach(function (b) {
      var xa = X(b.x0), xb = X(b.x1), w = Math.max(0.8, xb - xa - (xb - xa > 3 ? 1 : 0));
      var hgt = b.n > 0 ? Math.max(1, (b.n / ymax) * ph) : 0;
      var g = s('g', b.onclick ? { role: 'button', tabindex: 0, 'aria-label': b.title } : {});
      var hit = s('rect', { class: 'bh', x: xa, y: mt, width: Math.max(w, 1), height: ph });
      var bar = s('rect', { class: 'b' + (b.cls ? ' ' + b.cls : ''), x: xa, y: mt + ph - hgt, width: w, height: hgt });
      var title = s('title', {}, b.title);
      g.appendChild(title); g.appendChild(hit); g.appendChild(bar);
      if (b.onclick) {
        g.style.cursor = 'pointer';
        g.addEventListener('click', b.onclick);
        g.addEventListener('keydown', function (ev) { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); b.onclick(); } });
      }
      svg.appendChild(g);
    });
    svg.appendChild(s('line', { class: 'ax', x1: ml, x2: W - mr, y1: mt + ph + 0.5, y2: mt + ph + 0.5 }));
    (opts.xTicks || []).forEach(function (t) {
      var x = X(t.v);
      svg.appendChild(s('line', { class: 'ax', x1: x, x2: x, y1: mt + ph, y2: mt + ph + 4 }));
      svg.appendChild(s('text', { x: x, y: H - 6, 'text-anchor': 'middle' }, t.label));
    });
    return svg;
  };

  /* Activation histogram of one latent (edges: n+1 bin edges, counts: n). */
  SAE.actHistogram = function (edges, counts) {
    if (!edges || !counts || !counts.length) return null;
    var bars = counts.map(function (n, i) {
      return { x0: edges[i], x1: edges[i + 1], n: n, title: fmt(edges[i]) + ' – ' + fmt(edges[i + 1]) + ': ' + fmtInt(n) + ' tokens' };
    });
    var lo = edges[0], hi = edges[edges.length - 1];
    var xt = ticks(lo, hi, 4).map(function (v) { return { v: v, label: fmt(v) }; });
    return SAE.barChart({ bars: bars, xmin: lo, xmax: hi, xTicks: xt, width: 320, height: 150, label: 'Activation histogram' });
  };

  /* A table of (token, value) with bars: promoted / suppressed logits. */
  SAE.logitTable = function (toks, vals, sign) {
    if (!toks || !toks.length) return h('p', { class: 'empty', text: 'none' });
    var amax = Math.max.apply(null, vals.map(function (v) { return Math.abs(v || 0); })) || 1;
    var tb = h('tbody');
    toks.forEach(function (t, i) {
      var v = vals[i] || 0;
      var pct = Math.round((Math.abs(v) / amax) * 100);
      tb.appendChild(h('tr', null, [
        h('td', null, pill(t, sign)),
        h('td', { class: 'bar' }, h('div', { class: 'bar-track' }, h('div', { class: 'bar-fill ' + sign, style: 'width:' + pct + '%' }))),
        h('td', { class: 'v', text: (v > 0 ? '+' : '') + fmt(v) }),
      ]));
    });
    return h('table', { class: 'vals' }, tb);
  };

  /* A tooltip that follows token hovers at once (the native title waits a second): it shows the
     token and its activation, and hides the title meanwhile so the two do not stack. */
  SAE.installTooltips = function (container) {
    var tip = h('div', { class: 'tip', role: 'tooltip', 'aria-hidden': 'true' });
    document.body.appendChild(tip);
    var cur = null;
    function hide() {
      if (cur) { cur.setAttribute('title', cur.getAttribute('data-title')); cur.removeAttribute('data-title'); cur = null; }
      tip.style.display = 'none';
    }
    container.addEventListener('mouseover', function (ev) {
      var t = ev.target.closest ? ev.target.closest('.tk[data-act]') : null;
      if (t === cur) return;
      hide();
      if (!t) return;
      cur = t;
      t.setAttribute('data-title', t.getAttribute('title') || '');
      t.removeAttribute('title');
      var raw = t.getAttribute('data-title'), cut = raw.lastIndexOf(' \u00b7 ');
      tip.replaceChildren(h('span', { class: 'tip-v', text: cut >= 0 ? raw.slice(cut + 3) : '' }),
                          h('span', { class: 'tip-t', text: cut >= 0 ? raw.slice(0, cut) : raw }));
      tip.style.display = 'block';
      var r = t.getBoundingClientRect(), w = tip.offsetWidth;
      var x = Math.max(6, Math.min(window.innerWidth - w - 6, r.left + r.width / 2 - w / 2));
      tip.style.left = x + window.scrollX + 'px';
      tip.style.top = r.top + window.scrollY - tip.offsetHeight - 6 + 'px';
    });
    container.addEventListener('mouseleave', hide);
    window.addEventListener('scroll', hide, { passive: true });
  };

  /* Top bar with the run's model and site. */
  SAE.runLabel = function () {
    var sm = SAE.summary(), site = sm.site || {}, parts = [];
    if (sm.model) parts.push(String(sm.model));
    if (site.layer !== undefined || site.component) parts.push('layer ' + (site.layer !== undefined ? site.layer : '?') + (site.component ? ' ' + site.component : ''));
    return parts.join(' \u00b7 ');
  };

  /* Run details: every summary key, known or not. */
  SAE.runDetails = function () {
    var sm = SAE.summary(), keys = Object.keys(sm).sort();
    if (!keys.length) return null;
    var tb = h('tbody');
    keys.forEach(function (k) {
      var v = sm[k];
      tb.appendChild(h('tr', null, [h('td', { text: k }), h('td', { text: typeof v === 'string' ? v : JSON.stringify(v) })]));
    });
    return h('details', { class: 'run' }, [h('summary', { text: 'Run details (summary.json)' }), h('table', null, tb)]);
  };
})();
