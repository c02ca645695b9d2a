"""Extraction split over the ranks of an ``mx.distributed`` group (``mlx.launch``): one shard folder
per site, as one process writes it.

A split's texts are cut into the windows ``extract_split`` sorts and batches by
(``SORT_WINDOW_BATCHES`` batches of texts each), so a window's batches, and so its rows, are the same
whoever extracts it. The ranks count every window's rows (tokenizing only, each rank a share of the
windows), keep the windows that reach ``max_rows`` (the last one in part), and give each rank a
contiguous run of windows with about the same number of rows. Rank r extracts its run of every
site from one forward pass per batch (``extract_sites``) into each site's ``out/rank-<r>/``
(resumable, with its own manifest), then rank 0 writes each site's ``out/manifest.json`` naming every
rank's shards in rank order (``rank-00/shard-00000.arrow``, ...).

The rows, in storage order, are those one process writes (same texts, batches, order and
``max_rows``), and the manifest carries one process's fingerprint, so a later one-process run of the
same settings accepts the folder as complete; only the shard boundaries differ (each rank ends with a
partial shard). Every rank needs the prepared texts; the shards land in each rank's ``out``, so
with no shared filesystem copy the ``rank-*`` folders to rank 0's ``out`` before training there.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from saepipe.activations.config import ExtractConfig
from saepipe.activations.extract import (
    PROGRESS,
    SORT_WINDOW_BATCHES,
    extract_sites,
    finished_manifest,
    prepare_site_folders,
    split_fingerprint,
    write_passes,
)
from saepipe.activations.shards import MANIFEST, write_manifest
from saepipe.lm import tokens
from saepipe.lm.model import LoadedModel
from saepipe.lm.sites import Site, check_site
from saepipe.parallel.ranks import Ranks
from saepipe.texts.prepare import SPLITS, read_split

log = logging.getLogger(__name__)

RANK_FOLDER = "rank-{:02d}"
"""Rank r's sub-folder of a split's shard folder."""


def window_rows(tokenizer: Any, texts: list[str], cfg: ExtractConfig, ranks: Ranks) -> np.ndarray:
    """(n_windows,) rows each window of ``texts`` stores (before ``max_rows``); each rank tokenizes
    a share of the windows."""
    window = cfg.batch_size * SORT_WINDOW_BATCHES
    n_windows = -(-len(texts) // window)
    excluded = tokens.excluded_token_ids(tokenizer, cfg.skip_special_tokens)
    counts = np.zeros(n_windows)
    first, stop = ranks.bounds(n_windows)
    for w in range(first, stop):
        encoded = tokens.encode(tokenizer, texts[w * window : (w + 1) * window], cfg.context_length)
        counts[w] = sum(int((~np.isin(e, excluded)).sum()) for e in encoded)
    return ranks.sum64(counts)[0].round().astype(np.int64)


def plan_ranks(rows: np.ndarray, max_rows: int, size: int) -> list[tuple[int, int, int]]:
    """Per rank ``(first window, stop window, row quota)``: contiguous runs of the windows needed for
    ``max_rows`` rows, about equal in rows (each boundary at the window edge nearest its share);
    rank 0 gets at least one window (it writes the manifest), a later rank may get none (quota 0)."""
    cum = np.concatenate([[0], np.cumsum(rows)])
    needed = int(np.searchsorted(cum[1:], max_rows, side="left")) + 1 if len(rows) else 0
    needed = min(needed, len(rows))
    total = int(min(cum[needed], max_rows))
    starts = [0]
    for r in range(1, size):
        target = r * total / size
        best = int(np.argmin(np.abs(cum[: needed + 1] - target)))
        starts.append(max(starts[-1], best, min(1, needed)))
    starts.append(needed)
    return [(starts[r], starts[r + 1], int(min(cum[starts[r + 1]], total) - min(cum[starts[r]], total)))
            for r in range(size)]


def extract_sites_ranked(loaded: LoadedModel, texts_path: Path, outs: dict[Site, Path], cfg: ExtractConfig,
                         split: str, ranks: Ranks, *, progress: bool = True) -> tuple[dict[Site, dict[str, Any]],
                                                                                  dict[str, Any]]:
    """``extract_sites`` over the ranks (see the module docstring); every rank returns the manifests
    and what the pass did (all ranks together)."""
    outs = {Site(*site): Path(out) for site, out in outs.items()}
    ids, texts = read_split(Path(texts_path), split)
    fingerprints = {site: split_fingerprint(loaded, cfg, site, split, ids, texts) for site in outs}
    max_rows = cfg.max_rows(split)
    done = ({site.id: finished_manifest(out, fingerprints[site], max_rows) for site, out in outs.items()}
            if ranks.is_main else None)
    shared = json.loads(ranks.broadcast_bytes(json.dumps(done).encode()))
    manifests = {site: shared[site.id] for site in outs if shared[site.id] is not None}
    todo = [site for site in outs if site not in manifests]
    for site in manifests:
        log.info("%s: already complete (%d rows)", outs[site], manifests[site]["n_tokens"])
    stats = {"sites_run": [s.id for s in todo], "sites_reused": [s.id for s in manifests],
             "stop_layer": max((s.layer for s in todo), default=None), "batches": 0, "rows": 0, "seconds": 0.0,
             "ranks": ranks.size}
    if not todo:
        return manifests, stats
    if ranks.is_main:
        for site in todo:
            _clear(outs[site], ranks.size)
    plan = plan_ranks(window_rows(loaded.tokenizer, texts, cfg, ranks), max_rows, ranks.size)
    first, stop, quota = plan[ranks.rank]
    window = cfg.batch_size * SORT_WINDOW_BATCHES
    mine = None
    if quota > 0:
        ran = extract_sites(loaded, texts_path, {s: outs[s] / RANK_FOLDER.format(ranks.rank) for s in todo}, cfg,
                            split, progress=progress, text_range=(first * window, min(stop * window, len(texts))),
                            max_rows=quota)
        assert ran is not None
        mine = {"manifests": {s.id: m for s, m in ran[0].items()}, "stats": ran[1]._asdict()}
    parts = [json.loads(b) for b in ranks.gather_bytes(json.dumps(mine).encode())]
    written = None
    if ranks.is_main:
        written = {site.id: write_manifest(outs[site], merged_manifest(
            [None if p is None else p["manifests"][site.id] for p in parts], fingerprints[site], max_rows))
            for site in todo}
    written = json.loads(ranks.broadcast_bytes(json.dumps(written).encode()))
    manifests.update({site: written[site.id] for site in todo})
    ran_stats = [p["stats"] for p in parts if p is not None]
    stats.update(batches=sum(r["batches"] for r in ran_stats), rows=sum(r["rows"] for r in ran_stats),
                 seconds=max(r["seconds"] for r in ran_stats))
    return {site: manifests[site] for site in outs}, stats


def extract_split_ranked(loaded: LoadedModel, texts_path: Path, out: Path, cfg: ExtractConfig, split: str,
                         ranks: Ranks, *, site: Site | tuple[int, str], progress: bool = True) -> dict[str, Any]:
    """One site's ``extract_split`` over the ranks; every rank returns the manifest."""
    site = Site(*site)
    return extract_sites_ranked(loaded, texts_path, {site: out}, cfg, split, ranks, progress=progress)[0][site]


def merged_manifest(parts: list[dict[str, Any] | None], fingerprint: dict[str, Any],
                    max_rows: int) -> dict[str, Any]:
    """The manifest of a split folder from its ranks' manifests (None: a rank with no rows)."""
    present = [(r, m) for r, m in enumerate(parts) if m is not None]
    if not present:
        raise ValueError("no rank extracted any rows (all texts empty or special tokens)")
    body = {k: v for k, v in present[0][1].items() if k != "digest"}
    shards = [{**s, "file": f"{RANK_FOLDER.format(r)}/{s['file']}"} for r, m in present for s in m["shards"]]
    return {**body, "fingerprint": fingerprint, "texts_digest": fingerprint["texts_digest"], "max_rows": max_rows,
            "n_tokens": sum(m["n_tokens"] for _, m in present), "shards": shards, "ranks": len(parts)}


def _clear(out: Path, size: int) -> None:
    """Remove what a previous run left at the top of ``out`` (its manifest, one-process shards, rank
    folders of a larger group): the new manifest names only this run's shards."""
    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.name in (MANIFEST, PROGRESS) or path.name.startswith("shard-"):
            path.unlink()
        elif path.is_dir() and path.name.startswith("rank-") and path.name[5:].isdigit() and int(path.name[5:]) >= size:
            shutil.rmtree(path)


def extract_ranked(loaded: LoadedModel, texts_path: Path, out: Path, cfg: ExtractConfig, sites: list[Site],
                   ranks: Ranks, *, progress: bool = True) -> dict[Site, dict[str, dict[str, Any]]]:
    """Both splits of every site over the ranks into ``out/<site id>/{train,eval}`` (``extract``'s
    layout, ``extract.json`` included); rank 0 tidies ``out`` first (``prepare_site_folders``)."""
    out = Path(out)
    sites = [check_site(s[0], s[1], loaded.info.num_layers) for s in sites]
    if ranks.is_main:
        prepare_site_folders(out, sites)
    ranks.broadcast_bytes(b"tidied")  # the others wait until rank 0 has tidied the folders
    result: dict[Site, dict[str, dict[str, Any]]] = {site: {} for site in sites}
    passes = {}
    for split in SPLITS:
        manifests, passes[split] = extract_sites_ranked(loaded, texts_path, {s: out / s.id / split for s in sites},
                                                        cfg, split, ranks, progress=progress and ranks.is_main)
        for site, manifest in manifests.items():
            result[site][split] = manifest
    if ranks.is_main:
        write_passes(out, passes)
    return result


__all__ = ["RANK_FOLDER", "extract_ranked", "extract_sites_ranked", "extract_split_ranked", "merged_manifest",
           "plan_ranks", "window_rows"]
