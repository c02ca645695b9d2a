/* saepipe dashboard: the index page. Every latent's summary columns are in data/index.js; the table
   is sorted and filtered in memory and rendered one page at a time. Token search loads
   data/tokens.js on first use, then only the token-feature files of the matching tokens. */
(function () {
  'use strict';
  var SAE = window.SAE, h = SAE.h, fmt = SAE.fmt;
  var root = document.documentElement;
  var X = SAE.index || { n: 0, id: [], strings: [], top: [], prom: [] };
  var info = SAE.siteInfo(), sm = SAE.summary();
  var N = X.n, ids = X.id, dens = X.d || [], nf = X.nf || [];
  var PAGE = 100;
  var rowOf = {};
  for (var i = 0; i < N; i++) rowOf[ids[i]] = i;

  function isDead(i) { return (nf.length && nf[i] === 0) || (dens.length && dens[i] === 0); }

  /* ---- header ---------------------------------------------------------------------------- */
  var runLabel = SAE.runLabel();
  document.getElementById('run').textContent = runLabel;
  if (info.title) document.getElementById('title').textContent = info.title;
  document.title = (info.title || 'Features') + (runLabel ? ' \u00b7 ' + runLabel : '') + ' \u00b7 saepipe';
  var site = sm.site || {};
  var lede = [SAE.fmtInt(info.nFeatures || N) + ' latents of a TopK sparse autoencoder'];
  if (site.layer !== undefined || site.component) lede.push(' on the ' + (site.component || 'activations') + ' of layer ' + (site.layer !== undefined ? site.layer : '?'));
  if (sm.model) lede.push(' of ' + sm.model);
  if (sm.n_tokens) lede.push(', analyzed on ' + SAE.fmtCount(sm.n_tokens) + ' tokens');
  document.getElementById('lede').textContent = lede.join('') + '.';

  var nDead = 0, alive = [];
  for (var j = 0; j < N; j++) { if (isDead(j)) nDead++; else if (dens.length) alive.push(dens[j]); }
  alive.sort(function (a, b) { return a - b; });
  var median = alive.length ? alive[Math.floor(alive.length / 2)] : null;
  function stat(label, value, small) {
    return h('div', { class: 'stat' }, [h('dt', { text: label }), h('dd', null, [value, small ? h('small', { text: small }) : null])]);
  }
  var stats = document.getElementById('stats');
  stats.appendChild(stat('Features', SAE.fmtInt(info.nFeatures || N)));
  stats.appendChild(stat('Alive', SAE.fmtInt(N - nDead), N ? Math.round(((N - nDead) / N) * 1000) / 10 + '%' : null));
  stats.appendChild(stat('Dead', SAE.fmtInt(nDead), 'never fired'));
  if (median !== null) stats.appendChild(stat('Median density', SAE.fmtDensity(median), '1 in ' + SAE.fmtCount(Math.round(1 / median))));
  if (sm.n_tokens) stats.appendChild(stat('Tokens analyzed', SAE.fmtCount(sm.n_tokens)));
  if (sm.top_n) stats.appendChild(stat('Contexts / feature', String(sm.top_n), typeof sm.quantiles === 'number' ? '+ ' + sm.quantiles + ' quantiles' : null));

  /* ---- state in the URL hash ------------------------------------------------------------ */
  var state = { sort: 'id', page: 0, flo: null, fhi: null, q: '' };
  (function parse() {
    var p = new URLSearchParams((location.hash || '').slice(1));
    if (p.get('sort')) state.sort = p.get('sort');
    if (p.get('page')) state.page = Math.max(0, parseInt(p.get('page'), 10) - 1 || 0);
    if (p.get('dens')) {
      var r = p.get('dens').split(':');
      state.flo = r[0] === 'dead' ? 'dead' : parseFloat(r[0]);
      state.fhi = r[0] === 'dead' ? null : parseFloat(r[1]);
    }
    if (p.get('q') !== null) state.q = p.get('q');
  })();
  function saveState() {
    var p = new URLSearchParams();
    if (state.sort !== 'id') p.set('sort', state.sort);
    if (state.page) p.set('page', String(state.page + 1));
    if (state.flo !== null) p.set('dens', state.flo === 'dead' ? 'dead' : state.flo + ':' + state.fhi);
    if (state.q) p.set('q', state.q);
    var s = p.toString();
    history.replaceState(null, '', s ? '#' + s : location.pathname + location.search);
  }

  /* ---- density histogram ------------------------------------------------------------------ */
  var SUP = { '-': '\u207b', 0: '\u2070', 1: '\u00b9', 2: '\u00b2', 3: '\u00b3', 4: '\u2074', 5: '\u2075', 6: '\u2076', 7: '\u2077', 8: '\u2078', 9: '\u2079' };
  function pow10(e) { return e === 0 ? '1' : '10' + String(e).split('').map(function (c) { return SUP[c] || c; }).join(''); }
  var logs = [];
  for (var k = 0; k < N; k++) if (!isDead(k) && dens[k] > 0) logs.push(Math.log10(dens[k]));
  var lo = logs.length ? Math.floor(Math.min.apply(null, logs) * 5) / 5 : -6;
  var hi = logs.length ? Math.min(0, Math.ceil(Math.max.apply(null, logs) * 5) / 5) : 0;
  if (hi <= lo) hi = lo + 1;
  var BW = 0.1;
  function renderDensity() {
    var nb = Math.max(1, Math.round((hi - lo) / BW));
    var counts = new Array(nb).fill(0);
    logs.forEach(function (v) { counts[Math.min(nb - 1, Math.max(0, Math.floor((v - lo) / BW)))]++; });
    var bars = [];
    var deadX0 = lo - 0.85, deadX1 = lo - 0.45;
    if (nDead) {
      bars.push({ x0: deadX0, x1: deadX1, n: nDead, cls: 'dead' + (state.flo === 'dead' ? ' sel' : ''), title: 'dead (never fired): ' + SAE.fmtInt(nDead) + ' features',
        onclick: function () { setFilter('dead', null); } });
    }
    counts.forEach(function (c, b) {
      var a = lo + b * BW, z = a + BW;
      var sel = state.flo !== null && state.flo !== 'dead' && Math.abs(state.flo - a) < 1e-9;
      bars.push({ x0: a, x1: z, n: c, cls: sel ? 'sel' : '', title: 'density ' + SAE.fmtDensity(Math.pow(10, a)) + ' \u2013 ' + SAE.fmtDensity(Math.pow(10, z)) + ': ' + SAE.fmtInt(c) + ' features',
        onclick: c ? function () { setFilter(Math.round(a * 10) / 10, Math.round(z * 10) / 10); } : null });
    });
    var xt = [];
    for (var e = Math.ceil(lo); e <= Math.floor(hi); e++) xt.push({ v: e, label: pow10(e) });
    if (nDead) xt.push({ v: (deadX0 + deadX1) / 2, label: 'dead' });
    var svg = SAE.barChart({ bars: bars, xmin: nDead ? lo - 0.9 : lo, xmax: hi, xTicks: xt, width: 520, height: 170, ml: 40,
      label: 'Histogram of feature density (log scale)' });
    document.getElementById('density').replaceChildren(svg);
    document.getElementById('density-note').textContent = logs.length ? '\u00b7 ' + SAE.fmtInt(logs.length) + ' alive' : '';
  }

  /* ---- table ------------------------------------------------------------------------------ */
  var cols = { id: ids, d: dens, max: X.max || [], mean: X.mean || [] };
  var orderCache = {};
  function sorted(key) {
    if (orderCache[key]) return orderCache[key];
    var desc = key[0] === '-', name = desc ? key.slice(1) : key, c = cols[name] || ids;
    var idx = new Array(N);
    for (var i = 0; i < N; i++) idx[i] = i;
    idx.sort(function (a, b) {
      var va = c[a], vb = c[b];
      if (va === null || va === undefined) va = -Infinity;
      if (vb === null || vb === undefined) vb = -Infinity;
      if (va !== vb) return desc ? vb - va : va - vb;
      return ids[a] - ids[b];
    });
    return (orderCache[key] = idx);
  }
  function visibleRows() {
    var idx = sorted(state.sort);
    if (state.flo === null) return idx;
    if (state.flo === 'dead') return idx.filter(isDead);
    return idx.filter(function (i) {
      if (isDead(i) || !(dens[i] > 0)) return false;
      var v = Math.log10(dens[i]);
      return v >= state.flo - 1e-9 && v < state.fhi - 1e-9;
    });
  }
  function pills(list, cls) {
    var box = h('div', { class: 'pills' });
    (list || []).forEach(function (s) { box.appendChild(SAE.pill(X.strings[s], cls)); });
    return box;
  }
  function densCell(i) {
    var d = dens[i];
    var w = d > 0 ? Math.max(2, Math.round(((Math.log10(d) - lo) / (0 - lo)) * 100)) : 0;
    return h('div', { class: 'dens-cell', title: d !== undefined ? 'density ' + d + (nf.length ? ' (' + SAE.fmtInt(nf[i]) + ' tokens)' : '') : null }, [
      h('div', { class: 'bar-track' }, h('div', { class: 'bar-fill', style: 'width:' + w + '%' })),
      h('span', { class: 'num', text: SAE.fmtDensity(d) }),
    ]);
  }
  function renderTable() {
    var rows = visibleRows();
    var pages = Math.max(1, Math.ceil(rows.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * PAGE, end = Math.min(rows.length, start + PAGE);
    var frag = document.createDocumentFragment();
    for (var r = start; r < end; r++) {
      var i = rows[r], id = ids[i];
      frag.appendChild(h('tr', { class: isDead(i) ? 'dead' : null, 'data-id': id }, [
        h('td', { class: 'id' }, h('a', { href: SAE.featureHref(id), text: '#' + id })),
        h('td', { class: 'dens' }, densCell(i)),
        h('td', { class: 'r num', text: fmt(cols.max[i]) }),
        h('td', { class: 'r num', text: fmt(cols.mean[i]) }),
        h('td', null, pills(X.top[i], 'act')),
        h('td', null, pills(X.prom[i], 'pos')),
      ]));
    }
    if (!rows.length) frag.appendChild(h('tr', null, h('td', { colspan: 6, class: 'empty', text: 'No features match.' })));
    document.getElementById('rows').replaceChildren(frag);
    var pager = document.getElementById('pager');
    pager.replaceChildren(
      h('span', { class: 'info', text: rows.length ? 'Showing ' + SAE.fmtInt(start + 1) + '\u2013' + SAE.fmtInt(end) + ' of ' + SAE.fmtInt(rows.length) + ' features' : '' }),
      h('button', { type: 'button', id: 'page-prev', disabled: state.page === 0, onclick: function () { goPage(state.page - 1); } }, '\u2039 Prev'),
      h('span', { text: 'Page ' + (state.page + 1) + ' of ' + pages }),
      h('button', { type: 'button', id: 'page-next', disabled: state.page >= pages - 1, onclick: function () { goPage(state.page + 1); } }, 'Next \u203a')
    );
    document.getElementById('sort').value = state.sort;
    document.querySelectorAll('#table th[data-key]').forEach(function (th) {
      var key = th.getAttribute('data-key');
      if (state.sort === key) th.setAttribute('aria-sort', 'ascending');
      else if (state.sort === '-' + key) th.setAttribute('aria-sort', 'descending');
      else th.removeAttribute('aria-sort');
    });
    var chip = document.getElementById('filter');
    chip.replaceChildren();
    if (state.flo !== null) {
      var label = state.flo === 'dead' ? 'dead features' : 'density ' + SAE.fmtDensity(Math.pow(10, state.flo)) + ' \u2013 ' + SAE.fmtDensity(Math.pow(10, state.fhi));
      chip.appendChild(h('span', { class: 'chip' }, [label, h('button', { type: 'button', 'aria-label': 'Clear the density filter', onclick: function () { setFilter(null, null); } }, '\u00d7')]));
    }
  }
  function goPage(p) { state.page = Math.max(0, p); saveState(); renderTable(); document.getElementById('h-table').scrollIntoView({ block: 'start' }); }
  function setFilter(a, b) { state.flo = a; state.fhi = b; state.page = 0; saveState(); renderTable(); renderDensity(); }
  document.getElementById('sort').addEventListener('change', function (ev) { state.sort = ev.target.value; state.page = 0; saveState(); renderTable(); });
  document.querySelectorAll('#table th[data-key] button').forEach(function (b) {
    b.addEventListener('click', function () {
      var key = b.parentNode.getAttribute('data-key');
      var defDesc = key !== 'id';
      if (state.sort === key) state.sort = '-' + key;
      else if (state.sort === '-' + key) state.sort = key;
      else state.sort = defDesc ? '-' + key : key;
      state.page = 0; saveState(); renderTable();
    });
  });

  /* ---- search ------------------------------------------------------------------------------ */
  var qInput = document.getElementById('q'), results = document.getElementById('results');
  var normTok = null;
  function norm(s) { return s.trim().toLowerCase(); }
  /* Matching tokens, best first: exact, equal ignoring case and surrounding space, prefix, substring. */
  function matchTokens(q) {
    var T = SAE.tokens.tok, nq = norm(q), out = [];
    if (!normTok) normTok = T.map(norm);
    for (var i = 0; i < T.length; i++) {
      var t = T[i], n = normTok[i], sc = -1;
      if (t === q) sc = 0;
      else if (nq && n === nq) sc = t.trim() === q.trim() ? 1 : 2;
      else if (nq && n.lastIndexOf(nq, 0) === 0) sc = 3;
      else if (nq && n.indexOf(nq) >= 0) sc = 4;
      if (sc >= 0) out.push([sc, n.length, i]);
    }
    out.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1] || a[2] - b[2]; });
    return out;
  }
  function topTokensTitle(fid) {
    var i = rowOf[fid];
    if (i === undefined) return '';
    return (X.top[i] || []).map(function (s) { return SAE.quoted(X.strings[s]); }).join(', ');
  }
  function featureChip(fid, v) {
    var t = topTokensTitle(fid);
    return h('a', { class: 'fchip', href: SAE.featureHref(fid), title: 'feature ' + fid + (t ? ' \u00b7 top tokens ' + t : '') },
      [h('b', { text: '#' + fid }), v !== undefined && v !== null ? h('span', { class: 'v', text: fmt(v) }) : null]);
  }
  var searchSeq = 0;
  function search(q, fromSubmit) {
    var my = ++searchSeq;
    state.q = q; saveState();
    root.removeAttribute('data-search');
    var parts = [];
    var num = /^\s*#?(\d+)\s*$/.exec(q);
    if (num) {
      var fid = parseInt(num[1], 10), i = rowOf[fid];
      if (fromSubmit && i !== undefined) { location.href = SAE.featureHref(fid); return Promise.resolve(); }
      parts.push(i === undefined
        ? h('div', { class: 'res' }, h('p', { class: 'empty', text: 'No feature ' + fid + ' (ids run from 0 to ' + ((info.nFeatures || N) - 1) + ').' }))
        : h('div', { class: 'res feat-card' }, [featureChip(fid), h('span', { class: 'muted', text: 'density ' + SAE.fmtDensity(dens[i]) + ' \u00b7 max ' + fmt(cols.max[i]) }),
            pills(X.top[i], 'act'), h('a', { href: SAE.featureHref(fid), text: 'Open \u2192' })]));
    }
    if (!q) { results.replaceChildren(); root.setAttribute('data-search', 'done'); return Promise.resolve(); }
    if (!info.hasTokens) {
      if (!num) parts.push(h('p', { class: 'empty', text: 'This analysis has no token index (token_features.parquet).' }));
      results.replaceChildren.apply(results, parts);
      root.setAttribute('data-search', 'done');
      return Promise.resolve();
    }
    return SAE.loadTokens().then(function (T) {
      if (my !== searchSeq) return;
      var m = matchTokens(q), shown = m.slice(0, 8);
      var blocks = {};
      shown.forEach(function (x) { blocks[Math.floor(x[2] / T.bs)] = 1; });
      return Promise.all(Object.keys(blocks).map(function (b) { return SAE.loadTokenBlock(+b); })).then(function () {
        if (my !== searchSeq) return;
        shown.forEach(function (x) {
          var r = x[2], blk = SAE.tokenBlocks[Math.floor(r / T.bs)], o = r % T.bs;
          var fs = blk.f[o] || [], vs = blk.v[o] || [];
          var list = h('div', { class: 'res-feats' });
          fs.slice(0, 12).forEach(function (fid, j) { list.appendChild(featureChip(fid, vs[j])); });
          if (!fs.length) list.appendChild(h('span', { class: 'empty', text: 'no features recorded' }));
          parts.push(h('div', { class: 'res', 'data-token': T.tok[r] }, [
            h('div', { class: 'res-h' }, [SAE.pill(T.tok[r]), h('span', { text: 'token ' + T.id[r] + ' \u00b7 top ' + fs.length + ' feature' + (fs.length === 1 ? '' : 's') + ' by activation' })]),
            list,
          ]));
        });
        if (!m.length && !num) parts.push(h('p', { class: 'empty', text: 'No token matches \u201c' + q + '\u201d.' }));
        else if (m.length > shown.length) parts.push(h('p', { class: 'hint', text: SAE.fmtInt(m.length - shown.length) + ' more matching tokens; type more to narrow.' }));
        results.replaceChildren.apply(results, parts);
        root.setAttribute('data-search', 'done');
      });
    }).catch(function (err) {
      results.replaceChildren(h('p', { class: 'notice', text: 'Search failed: ' + err.message }));
      root.setAttribute('data-search', 'error');
    });
  }
  var timer = null;
  qInput.addEventListener('input', function () {
    clearTimeout(timer);
    timer = setTimeout(function () { search(qInput.value, false); }, 160);
  });
  document.getElementById('search').addEventListener('submit', function (ev) {
    ev.preventDefault();
    clearTimeout(timer);
    search(qInput.value, true);
  });

  /* Suggestions: the top tokens of the features with the largest activations, and one feature id. */
  (function suggestions() {
    var box = document.getElementById('try'), seen = {}, picks = [];
    if (!N) return;
    var byMax = sorted('-max');
    for (var r = 0; r < byMax.length && picks.length < 4; r++) {
      var t = (X.top[byMax[r]] || [])[0];
      if (t === undefined) continue;
      var s = X.strings[t];
      if (!s.trim() || seen[s.trim().toLowerCase()]) continue;
      seen[s.trim().toLowerCase()] = 1;
      picks.push(s.trim());
    }
    box.appendChild(h('span', { text: 'Try' }));
    picks.concat([String(ids[Math.min(N - 1, 42)])]).forEach(function (q) {
      box.appendChild(h('button', { type: 'button', title: 'search for ' + SAE.quoted(q), onclick: function () { qInput.value = q; search(q, false); } }, SAE.pill(q)));
    });
  })();

  /* ---- go ---------------------------------------------------------------------------------- */
  renderDensity();
  renderTable();
  var details = SAE.runDetails();
  if (details) document.getElementById('details').appendChild(details);
  if (state.q) { qInput.value = state.q; search(state.q, false); }
  SAE.readyAt = performance.now();
  root.setAttribute('data-ready', 'index');
})();
