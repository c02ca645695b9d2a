"""Extraction split over the ranks of an ``mx.distributed`` group (``mlx.launch``): one shard folder.

A split's texts are cut into the windows ``extract_split`` sorts and batches by
(``SORT_WINDOW_BATCHES`` batches of texts each), so a window's batches, and so its rows, are the same
whoever extracts it. The ranks count every window's rows (tokenizing only, each rank a share of the
windows), keep the windows that reach ``max_rows`` (the last one in part), and give each rank a
contiguous run of windows with about the same number of rows. Rank r extracts its run with
``extract_split`` into ``out/rank-<r>/`` (resumable, with its own manifest), then rank 0 writes
``out/manifest.json`` naming every rank's shards in rank order (``rank-00/shard-00000.arrow``, ...).

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
    extract_split,
    finished_manifest,
    split_fingerprint,
)
from saepipe.activations.shards import MANIFEST, write_manifest
from saepipe.lm import tokens
from saepipe.lm.model import LoadedModel
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


def extract_split_ranked(loaded: LoadedModel, texts_path: Path, out: Path, cfg: ExtractConfig, split: str,
                         ranks: Ranks, *, progress: bool = True) -> dict[str, Any]:
    """``extract_split`` over the ranks (see the module docstring); every rank returns the manifest."""
    out = Path(out)
    ids, texts = read_split(Path(texts_path), split)
    fingerprint = split_fingerprint(loaded, cfg, split, ids, texts)
    max_rows = cfg.max_rows(split)
    done = finished_manifest(out, fingerprint, max_rows) if ranks.is_main else None
    shared = json.loads(ranks.broadcast_bytes(json.dumps(done).encode()))
    if shared is not None:
        log.info("%s: already complete (%d rows)", out, shared["n_tokens"])
        return shared
    if ranks.is_main:
        _clear(out, ranks.size)
    plan = plan_ranks(window_rows(loaded.tokenizer, texts, cfg, ranks), max_rows, ranks.size)
    first, stop, quota = plan[ranks.rank]
    window = cfg.batch_size * SORT_WINDOW_BATCHES
    mine = None
    if quota > 0:
        mine = extract_split(loaded, texts_path, out / RANK_FOLDER.format(ranks.rank), cfg, split, progress=progress,
                             text_range=(first * window, min(stop * window, len(texts))), max_rows=quota)
    parts = [json.loads(b) for b in ranks.gather_bytes(json.dumps(mine).encode())]
    manifest = None
    if ranks.is_main:
        manifest = write_manifest(out, merged_manifest(parts, fingerprint, max_rows))
    return json.loads(ranks.broadcast_bytes(json.dumps(manifest).encode()))


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


def extract_ranked(loaded: LoadedModel, texts_path: Path, out: Path, cfg: ExtractConfig, ranks: Ranks,
                   *, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Both splits over the ranks into ``out/train`` and ``out/eval`` (``extract``'s layout)."""
    return {split: extract_split_ranked(loaded, texts_path, Path(out) / split, cfg, split, ranks,
                                        progress=progress and ranks.is_main)
            for split in SPLITS}


__all__ = ["RANK_FOLDER", "extract_ranked", "extract_split_ranked", "merged_manifest", "plan_ranks", "window_rows"]
