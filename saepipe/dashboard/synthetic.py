"""A synthetic ``analyze`` output (the dashboard's data contract), for tests and development.

``write_synthetic_analysis(out_dir)`` writes ``features.parquet``, ``examples.parquet``,
``token_features.parquet`` and ``summary.json`` with the columns and types the ``analyze`` stage
produces, at realistic sizes by default (9,216 latents, 20 top contexts and 5 quantiles x 4 samples
per latent, windows of 32 tokens). The data is coherent enough to look at: each latent fires on a
few "theme" tokens, its contexts have that token at the maximum, and ``token_features`` lists the
latents whose theme contains the token. A few tokens are hostile on purpose (``<script>``, ``&``,
quotes, newlines, tabs, emoji, right-to-left text) so escaping is exercised everywhere.

    python -m saepipe.dashboard synthetic data/analyze-synthetic --features 9216
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the of and to in a is that was for it on with as he by at his be from this are have had not "
    "but or an they which one you were her all she there would their we him been has when who will "
    "more no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three states himself few house use during "
    "without again place American around however home small found thought went say part once "
    "general high upon school every don does got united left number course war until always away "
    "something fact though water less public put think almost hand enough far took head yet "
    "government system better set told nothing night end why called didn eyes find going look "
    "asked later knew point next program city business give group toward young days let room "
    "president side social given present several order national possible rather second face per "
    "among form important often things looked early white case John become large big need four "
    "within felt along children saw best church ever least power development light thing seemed "
    "family interest want members mind country area others done turned although open God service "
    "problem certain kind different thus began door help means sense whole matter perhaps itself "
    "York times law human line above name example action company hands local show whether five "
    "history gave today either act feet across taken past quite anything seen having death week "
    "experience body word half really field car words already themselves information tell "
    "together college shall money period held keep sure free real seems behind cannot political "
    "air question office brought whose special major heard problems federal became study ago "
    "moment available known result street economic boy position reason change south board "
    "individual job society areas west close turn love community true court force full seem "
    "Paris France London England Berlin Germany Tokyo Japan Rome Italy Madrid Spain river mountain "
    "island ocean forest desert village bridge castle garden music film book team party market "
    "king queen army science poetry winter summer morning evening Monday Friday January March "
    "happy quiet bright strong ancient modern quickly slowly carefully suddenly function return "
    "class import const print value error true false null string number array object"
).split()

# Tokens that must survive escaping in every view.
HOSTILE_TOKENS = [
    "<script>",
    "</script>",
    " <b>",
    "&",
    " &amp;",
    '"',
    "'",
    ' "quoted"',
    "\n",
    "\n\n",
    "\t",
    " ",
    "  ",
    "\u2028",
    " 🙂",
    " שלום",
    " ${x}",
    "`",
    "\\",
    " {{x}}",
    " <img src=x onerror=window.__pwned=1>",
]


def _zipf_tokens(rng: np.random.Generator, V: int, n: int) -> np.ndarray:
    """``n`` token ids, frequent ones (low ids: common words) far more often, roughly like text.

    Sampled through a 2**18-entry table (each id repeated in proportion to its probability): one
    uniform integer and one gather per token, much faster than ``rng.choice(p=...)``."""
    p = 1.0 / (np.arange(V) + 8.0) ** 1.1
    p[: len(HOSTILE_TOKENS)] = 0.0
    size = 1 << 18
    reps = np.floor(p / p.sum() * size).astype(np.int64)
    table = np.repeat(np.arange(V), reps)
    return table[rng.integers(0, len(table), n)]


def synthetic_vocab(size: int = 6000, seed: int = 0) -> list[str]:
    """Token strings: words with and without a leading space, sub-word pieces, punctuation, the hostile
    tokens above, deduplicated, in a fixed order."""
    rng = np.random.default_rng(seed)
    vocab: list[str] = []
    seen: set[str] = set()

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)

    # Order = frequency rank for _zipf_tokens: spaced words and punctuation first, then capitalised
    # and unspaced forms, then random sub-word pieces.
    for t in HOSTILE_TOKENS:
        add(t)
    punct = [".", ",", " the", " of", " and", ";", ":", "!", "?", " (", ")", " -", "'s", " 1", " 2"]
    for i, w in enumerate(_WORDS):
        if i < len(punct) * 6 and i % 6 == 0:
            add(punct[i // 6])
        add(" " + w)
    for w in _WORDS:
        add(" " + w.capitalize())
    for w in _WORDS:
        add(w.capitalize())
        add(w)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    while len(vocab) < size:
        n = int(rng.integers(2, 9))
        piece = "".join(rng.choice(letters, n))
        add((" " if rng.random() < 0.6 else "") + piece)
    return vocab[:size]


def write_synthetic_analysis(
    out_dir: str | Path,
    *,
    n_features: int = 9216,
    top_n: int = 20,
    n_quantiles: int = 5,
    per_quantile: int = 4,
    window: int = 32,
    vocab_size: int = 6000,
    n_token_rows: int | None = None,
    features_per_token: int = 16,
    dead_fraction: float = 0.01,
    seed: int = 0,
) -> Path:
    """Write a synthetic analysis folder; returns its path. Deterministic for a given seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = synthetic_vocab(vocab_size, seed)
    V = len(vocab)
    paris = vocab.index(" Paris")
    F = n_features
    n_tokens = 383_000

    # --- per-latent statistics -------------------------------------------------------------
    log_density = rng.uniform(-5.2, -0.6, F)
    dead = rng.random(F) < dead_fraction
    dead[:3] = False  # features 0-2 fire on " Paris" (below)
    density = np.where(dead, 0.0, 10.0**log_density)
    n_fired = np.round(density * n_tokens).astype(np.int64)
    n_fired[~dead] = np.maximum(n_fired[~dead], 1)
    n_fired[:3] = np.maximum(n_fired[:3], 200)
    density = n_fired / n_tokens
    dead = n_fired == 0
    max_act = np.where(dead, 0.0, rng.gamma(4.0, 1.2, F) + 0.5).astype(np.float32)
    mean_act = (max_act * rng.uniform(0.15, 0.45, F)).astype(np.float32)

    # Each live latent fires on 1-3 theme tokens; a handful fire on " Paris".
    themes = rng.integers(40, min(V, 1200), (F, 3))
    themes[rng.random(F) < 0.004, 0] = paris
    themes[:3, 0] = paris  # features 0-2: always findable by " Paris"
    n_theme = rng.integers(1, 4, F)

    n_bins = 32
    vocab_arr = pa.array(vocab, type=pa.string())

    def lists(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
        offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offs), pa.array(values))

    # Histograms: 32 bins over (0, max_act], counts decaying with the activation; none when dead.
    hist_len = np.where(dead, 0, n_bins)
    grid = np.linspace(0.0, 1.0, n_bins + 1, dtype=np.float32)
    edges = (max_act[:, None] * grid[None, :]).astype(np.float32)
    lam = rng.uniform(2.0, 8.0, F)[:, None]
    w = np.exp(-lam * np.linspace(0, 1, n_bins)[None, :]) + 1e-3
    w /= w.sum(1, keepdims=True)
    counts = np.floor(w * n_fired[:, None]).astype(np.int64)
    counts[:, 0] += n_fired - counts.sum(1)
    edges_col = lists(edges[~dead].ravel(), np.where(dead, 0, n_bins + 1))
    counts_col = lists(counts[~dead].ravel(), hist_len)
    # Logit effects: the first theme token is the top promoted one.
    start = rng.integers(0, V, F)[:, None]
    step = rng.integers(1, max(2, V // 20), F)[:, None]
    idx = (start + step * np.arange(20)[None, :]) % V  # 20 distinct tokens per latent
    idx[:, 0] = themes[:, 0]
    pv = (np.sort(rng.gamma(2.0, 0.4, (F, 10)), axis=1)[:, ::-1] + 0.2).astype(np.float32)
    sv = (-(np.sort(rng.gamma(2.0, 0.3, (F, 10)), axis=1)[:, ::-1] + 0.2)).astype(np.float32)
    ten = np.full(F, 10)
    prom_t = pa.ListArray.from_arrays(
        pa.array(np.arange(0, F * 10 + 1, 10, dtype=np.int32)),
        pc.take(vocab_arr, pa.array(idx[:, :10].ravel())),
    )
    sup_t = pa.ListArray.from_arrays(
        pa.array(np.arange(0, F * 10 + 1, 10, dtype=np.int32)),
        pc.take(vocab_arr, pa.array(idx[:, 10:].ravel())),
    )
    # Neighbours: 10 other latents, cosine descending.
    nb = rng.integers(0, F - 1, (F, 10))
    nb = np.where(nb >= np.arange(F)[:, None], nb + 1, nb).astype(np.int32)
    ncos = np.sort(rng.uniform(0.15, 0.75, (F, 10)), axis=1)[:, ::-1].astype(np.float32)

    features = pa.table(
        {
            "feature": pa.array(np.arange(F, dtype=np.int32)),
            "density": pa.array(density.astype(np.float64)),
            "n_fired": pa.array(n_fired),
            "mean_act": pa.array(mean_act),
            "max_act": pa.array(max_act),
            "hist_edges": edges_col,
            "hist_counts": counts_col,
            "promoted_tokens": prom_t,
            "promoted_values": lists(pv.ravel(), ten),
            "suppressed_tokens": sup_t,
            "suppressed_values": lists(sv.ravel(), ten),
            "neighbors": lists(nb.ravel(), ten),
            "neighbor_cos": lists(ncos.ravel(), ten),
        }
    )
    pq.write_table(features, out / "features.parquet")

    # --- example contexts (vectorized) ------------------------------------------------------
    # Up to top_n top contexts (no more than the latent fired), then per_quantile samples of each
    # quantile, written in display order: top by rank, then q{m-1} .. q0.
    live = np.flatnonzero(~dead)
    n_top = np.minimum(top_n, n_fired[live])
    n_pq = np.minimum(per_quantile, np.maximum(0, (n_fired[live] - top_n) // n_quantiles))
    e_f = n_top + n_quantiles * n_pq
    R = int(e_f.sum())
    ex_feature = np.repeat(live, e_f).astype(np.int32)
    j = np.arange(R) - np.repeat(np.cumsum(e_f) - e_f, e_f)
    nt, npq = np.repeat(n_top, e_f), np.maximum(np.repeat(n_pq, e_f), 1)
    is_top = j < nt
    qj = j - nt
    kq = np.where(is_top, -1, (n_quantiles - 1) - qj // npq)
    ex_rank = np.where(is_top, j, qj % npq).astype(np.int32)
    kind_names = ["top", *[f"q{q}" for q in range(n_quantiles)]]
    # Window lengths: mostly full, some cut by the start/end of a document.
    lens = np.where(rng.random(R) < 0.9, window, rng.integers(4, window, R)).astype(np.int64)
    centers = np.minimum(rng.integers(0, window, R), lens - 1)
    centers = np.where(rng.random(R) < 0.6, np.minimum(lens - 1, window * 3 // 4), centers)
    centers = centers.astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    T = int(offsets[-1])
    tok = _zipf_tokens(rng, V, T)
    # Mix hostile tokens in often enough that every page shows some.
    hostile = rng.random(T) < 0.01
    tok[hostile] = rng.integers(0, len(HOSTILE_TOKENS), int(hostile.sum()))
    row_of = np.repeat(np.arange(R), lens)
    pos = np.arange(T) - offsets[row_of]
    # Activation of each example at its max: top examples descend from max_act; quantile q samples
    # sit in the q-th slice of (0, 0.75 max_act].
    mx = max_act[ex_feature]
    frac_top = 1.0 - 0.02 * ex_rank - 0.01 * rng.random(R)
    frac_q = (np.maximum(kq, 0) + 0.1 + 0.8 * rng.random(R)) / n_quantiles
    ex_max = (mx * np.where(is_top, frac_top, frac_q * 0.75)).astype(np.float32)
    # Theme tokens at the center and at a few other positions; the center is the maximum.
    f_of_tok = ex_feature[row_of]
    theme_pick = rng.integers(0, 3, T) % n_theme[f_of_tok]
    theme_tok = themes[f_of_tok, theme_pick]
    is_center = pos == centers[row_of]
    secondary = (~is_center) & (rng.random(T) < 0.08)
    tok = np.where(is_center | secondary, theme_tok, tok)
    acts = np.zeros(T, dtype=np.float32)
    acts[is_center] = ex_max
    sec_act = ex_max[row_of] * rng.uniform(0.05, 0.9, T).astype(np.float32)
    acts[secondary] = sec_act[secondary]
    # Weak spill-over onto the token after the center.
    after = pos == centers[row_of] + 1
    acts[after] = ex_max[row_of][after] * 0.15
    tokens_flat = pc.take(pa.array(vocab, type=pa.string()), pa.array(tok))
    examples = pa.table(
        {
            "feature": pa.array(ex_feature),
            "kind": pc.take(pa.array(kind_names, type=pa.string()), pa.array(kq + 1)),
            "rank": pa.array(ex_rank),
            "split": pc.take(
                pa.array(["train", "eval"]), pa.array((rng.random(R) >= 0.9).astype(np.int8))
            ),
            "doc_id": pa.array(rng.integers(0, 8000, R).astype(np.int64)),
            "tokens": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), tokens_flat),
            "acts": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(acts)),
            "center": pa.array(centers),
            "max_act": pa.array(ex_max),
        }
    )
    pq.write_table(examples, out / "examples.parquet")

    # --- token -> features ------------------------------------------------------------------
    n_rows = V if n_token_rows is None else min(V, n_token_rows)
    tf_ids = np.sort(rng.choice(V, n_rows, replace=False))
    tf_ids[0] = paris if paris not in tf_ids else tf_ids[0]
    tf_ids = np.unique(np.append(tf_ids, paris))
    by_token: dict[int, list[int]] = {}
    for f in live:
        for t in themes[f, : n_theme[f]]:
            by_token.setdefault(int(t), []).append(int(f))
    tf_feats, tf_vals = [], []
    for t in tf_ids:
        fs = by_token.get(int(t), [])[:features_per_token]
        extra = rng.choice(live, max(0, features_per_token - len(fs)) // 2, replace=False)
        fs = [*fs, *[int(x) for x in extra if int(x) not in fs]]
        vals = np.sort(rng.gamma(2.0, 1.5, len(fs)))[::-1].astype(np.float32)
        tf_feats.append(fs)
        tf_vals.append(vals.tolist())
    token_features = pa.table(
        {
            "token_id": pa.array(tf_ids.astype(np.int32)),
            "token": pa.array([vocab[i] for i in tf_ids], type=pa.string()),
            "features": pa.array(tf_feats, type=pa.list_(pa.int32())),
            "values": pa.array(tf_vals, type=pa.list_(pa.float32())),
        }
    )
    pq.write_table(token_features, out / "token_features.parquet")

    summary = {
        "n_features": F,
        "n_tokens": n_tokens,
        "model": "synthetic (SmolLM2-135M-Instruct shaped)",
        "site": {"layer": 6, "component": "mlp"},
        "top_n": top_n,
        "quantiles": n_quantiles,
        "window": window,
        "dead": int(dead.sum()),
        "splits": ["train", "eval"],
        "seconds": 42.0,
        "some_future_key": {"nested": [1, 2, 3]},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out
