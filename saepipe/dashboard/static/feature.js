/* saepipe dashboard: the feature page (feature.html#123). Loads the one data file holding the
   latent, then renders its statistics, histogram, logit effects, neighbours and contexts. */
(function () {
  'use strict';
  var SAE = window.SAE, h = SAE.h, fmt = SAE.fmt;
  var root = document.documentElement;
  var content = document.getElementById('content');
  var info = SAE.siteInfo();
  var runLabel = SAE.runLabel();
  document.getElementById('run').textContent = runLabel;

  function currentId() {
    var m = /^#?(\d+)/.exec(decodeURIComponent(location.hash || ''));
    return m ? parseInt(m[1], 10) : 0;
  }

  function setNav(id) {
    var n = info.nFeatures || 0;
    [['prev', id - 1], ['next', id + 1]].forEach(function (p) {
      var a = document.getElementById(p[0]), ok = p[1] >= 0 && p[1] < n;
      a.setAttribute('href', ok ? '#' + p[1] : '#' + id);
      a.setAttribute('aria-disabled', ok ? 'false' : 'true');
      if (!ok) a.setAttribute('tabindex', '-1'); else a.removeAttribute('tabindex');
    });
    document.getElementById('title').textContent = 'Feature ' + id;
    document.getElementById('crumb').textContent = 'Feature ' + id;
    document.getElementById('go-id').setAttribute('max', String(Math.max(0, n - 1)));
    document.title = 'Feature ' + id + ' \u00b7 ' + (runLabel || 'saepipe dashboard');
  }

  function stat(label, value, small, title) {
    return h('div', { class: 'stat', title: title || null }, [
      h('dt', { text: label }),
      h('dd', null, [value, small ? h('small', { text: small }) : null]),
    ]);
  }

  function card(title, count, body, id) {
    var h2 = h('h2', id ? { id: id } : null, [title, count ? h('span', { class: 'count', text: ' \u00b7 ' + count }) : null]);
    return h('section', { class: 'card', 'aria-labelledby': id || null }, [h2].concat(body));
  }

  function render(f, block) {
    var frag = document.createDocumentFragment();
    var sm = SAE.summary();
    var dens = f.d, n = f.n;
    var oneIn = dens > 0 ? '1 in ' + SAE.fmtCount(Math.round(1 / dens)) : null;
    var glance = [];
    if (f.tt && f.tt.length) {
      glance.push(h('span', { class: 'muted', text: 'Fires most on' }));
      f.tt.forEach(function (t) { glance.push(SAE.pill(t, 'act')); });
    }
    if (f.pt && f.pt.length) {
      glance.push(h('span', { class: 'muted' + (glance.length ? ' gap' : ''), text: glance.length ? '\u00b7 promotes' : 'Promotes' }));
      f.pt.slice(0, 3).forEach(function (t) { glance.push(SAE.pill(t, 'pos')); });
    }
    if (glance.length) frag.appendChild(h('p', { class: 'glance' }, glance));
    frag.appendChild(h('dl', { class: 'stats', id: 'fstats' }, [
      stat('Density', SAE.fmtDensity(dens), oneIn, dens !== undefined ? 'fraction of tokens: ' + dens : null),
      stat('Fires on', SAE.fmtInt(n), 'tokens', sm.n_tokens ? 'of ' + SAE.fmtInt(sm.n_tokens) + ' analyzed tokens' : null),
      stat('Mean activation', fmt(f.mean), null, 'mean over the tokens where it fires'),
      stat('Max activation', fmt(f.max)),
    ]));
    var examples = SAE.examples(block, f);
    if (n === 0 || (dens === 0 && !examples.length)) {
      frag.appendChild(h('p', { class: 'notice', text: 'This latent never fired on the analyzed tokens (a dead latent): it has no contexts.' }));
    }
    var grid = h('div', { class: 'fgrid' });
    var aside = h('div', { class: 'side' });
    var hist = SAE.actHistogram(f.he, f.hc);
    aside.appendChild(card('Activations', f.n ? SAE.fmtInt(f.n) + ' tokens' : null,
      hist ? [hist, h('p', { class: 'legend', text: 'Histogram of this latent\u2019s activation over the tokens where it fires.' })]
           : [h('p', { class: 'empty', text: 'No histogram.' })], 'h-hist'));
    aside.appendChild(card('Promoted tokens', null, [SAE.logitTable(f.pt, f.pv, 'pos')], 'h-pos'));
    aside.appendChild(card('Suppressed tokens', null, [SAE.logitTable(f.st, f.sv, 'neg')], 'h-neg'));
    aside.appendChild(card('Nearest features', 'decoder cosine', [neighbours(f)], 'h-nb'));
    grid.appendChild(aside);

    var main = h('div', { class: 'examples' });
    var scale = f.max > 0 ? f.max : Math.max.apply(null, [0].concat(examples.map(function (e) { return e.max || 0; })));
    var groups = [];
    examples.forEach(function (e) {
      var g = groups[groups.length - 1];
      if (!g || g.kind !== e.kind) groups.push((g = { kind: e.kind, items: [] }));
      g.items.push(e);
    });
    var top = groups.filter(function (g) { return g.kind === 'top'; });
    var rest = groups.filter(function (g) { return g.kind !== 'top'; });
    // Number of quantiles: summary.quantiles when it is a count, else one past the highest q<i>.
    var qmax = -1;
    rest.forEach(function (g) { var m = /^q(\d+)$/.exec(g.kind); if (m) qmax = Math.max(qmax, +m[1]); });
    var nq = typeof sm.quantiles === 'number' ? sm.quantiles : qmax >= 0 ? qmax + 1 : null;
    main.appendChild(card('Top activations', top.length ? top[0].items.length + ' contexts' : null,
      top.length ? [contexts(top[0].items, scale)] : [h('p', { class: 'empty', text: 'No contexts.' })], 'h-top'));
    if (rest.length) {
      var body = [];
      rest.forEach(function (g) {
        var mx = g.items.map(function (e) { return e.max; });
        body.push(h('h3', null, [SAE.kindLabel(g.kind, nq),
          h('span', { class: 'range', text: 'marked-token activation ' + fmt(Math.min.apply(null, mx)) + ' – ' + fmt(Math.max.apply(null, mx)) })]));
        body.push(contexts(g.items, scale));
      });
      main.appendChild(card('Samples across the activation range', rest.length + ' intervals', body, 'h-quant'));
    }
    grid.appendChild(main);
    frag.appendChild(grid);
    return frag;
  }

  function contexts(items, scale) {
    var box = h('div', { class: 'ctxs' });
    items.forEach(function (e) { box.appendChild(SAE.contextRow(e, scale)); });
    return box;
  }

  function neighbours(f) {
    if (!f.nb || !f.nb.length) return h('p', { class: 'empty', text: 'none' });
    var tb = h('tbody');
    f.nb.forEach(function (id, i) {
      var c = f.nc ? f.nc[i] : null, tt = f.nbt ? f.nbt[i] : null;
      tb.appendChild(h('tr', null, [
        h('td', null, [h('a', { href: SAE.featureHref(id), text: '#' + id }), tt !== null && tt !== undefined ? ' ' : null,
          tt !== null && tt !== undefined ? SAE.pill(tt, 'act', 'its top activating token') : null]),
        h('td', { class: 'bar' }, h('div', { class: 'bar-track' }, h('div', { class: 'bar-fill cos', style: 'width:' + Math.round(Math.max(0, Math.min(1, c || 0)) * 100) + '%' }))),
        h('td', { class: 'v', text: c === null ? '' : fmt(c) }),
      ]));
    });
    return h('table', { class: 'vals' }, tb);
  }

  function missing(id) {
    var n = info.nFeatures || 0;
    var msg = id >= n ? 'There is no feature ' + id + ': this SAE has ' + SAE.fmtInt(n) + ' features (0 \u2013 ' + (n - 1) + ').'
                      : 'No data for feature ' + id + ' in this analysis.';
    return h('p', { class: 'notice', text: msg });
  }

  var seq = 0;
  function show() {
    var id = currentId(), my = ++seq;
    root.removeAttribute('data-ready');
    setNav(id);
    SAE.loadBlock(SAE.blockOf(id)).then(function (block) {
      if (my !== seq) return;
      var f = SAE.featureFrom(block, id);
      content.replaceChildren(f ? render(f, block) : missing(id));
      SAE.readyAt = performance.now();
      root.setAttribute('data-ready', 'feature:' + id);
    }, function (err) {
      if (my !== seq) return;
      content.replaceChildren(h('p', { class: 'notice', text: 'Could not load the data for feature ' + id + ': ' + err.message }));
      root.setAttribute('data-ready', 'error');
    });
  }

  document.getElementById('go').addEventListener('submit', function (ev) {
    ev.preventDefault();
    var v = document.getElementById('go-id').value.trim();
    if (/^\d+$/.test(v)) location.hash = '#' + parseInt(v, 10);
  });
  document.addEventListener('keydown', function (ev) {
    var t = ev.target;
    if (ev.altKey || ev.ctrlKey || ev.metaKey || (t && /^(INPUT|SELECT|TEXTAREA)$/.test(t.tagName))) return;
    var id = currentId(), n = info.nFeatures || 0;
    if (ev.key === 'ArrowLeft' && id > 0) location.hash = '#' + (id - 1);
    else if (ev.key === 'ArrowRight' && id + 1 < n) location.hash = '#' + (id + 1);
  });
  window.addEventListener('hashchange', function () { show(); window.scrollTo(0, 0); });
  SAE.installTooltips(content);
  show();
})();
