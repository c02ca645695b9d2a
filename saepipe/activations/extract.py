"""Extract activations of one site for the prepared texts into resumable shard folders.

Texts of a split are tokenized (``tokenizer.encode``, with the tokenizer's BOS policy), truncated
to ``context_length``, sorted by length within windows of consecutive texts (stable, so the order
is deterministic), grouped into batches of ``batch_size`` texts (right padded to the longest text
of the batch) and run through ``forward(stop_layer=layer, capture=[site])``. Rows are stored text
by text in batch order, positions in order (``doc_id``/``position`` columns say where each row
came from); pad positions are never stored, nor BOS/special tokens when ``skip_special_tokens``.
Writing stops at ``max_tokens`` rows.

Because the batches are a fixed function of the texts, a rerun after an interruption keeps the complete
shards whose checksums match (listed in ``_progress.json``), skips the texts they cover without
running the model on them, and writes exactly what an uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from saepipe.activations.config import ExtractConfig
from saepipe.activations.shards import (
    MANIFEST,
    SHARD_PATTERN,
    ShardInfo,
    ShardWriter,
    read_manifest,
    write_manifest,
)
from saepipe.lm import tokens
from saepipe.lm.forward import forward
from saepipe.lm.model import LoadedModel
from saepipe.lm.sites import Site, check_site
from saepipe.runtime.files import atomic_write_bytes, file_sha256
from saepipe.runtime.version import __version__
from saepipe.texts.prepare import SPLITS, read_split

log = logging.getLogger(__name__)

PROGRESS = "_progress.json"


class _Interrupted(Exception):
    """Raised after ``max_shards`` new shards (a simulated kill)."""


class Batch(NamedTuple):
    tokens: np.ndarray
    """(B, T) int32 token ids, right padded."""
    keep: np.ndarray
    """(B, T) bool: positions whose rows are stored."""
    doc_ids: np.ndarray
    """(B,) int64 prepare ids of the texts."""
    lengths: np.ndarray
    """(B,) tokens of each text (after truncation); positions past it are padding."""


SORT_WINDOW_BATCHES = 32
"""Texts are sorted by token count within windows of this many batches: similar lengths share a
batch, so little compute goes to padding."""


def make_batches(
    tokenizer: Any, ids: np.ndarray, texts: Sequence[str], cfg: ExtractConfig, start_batch: int = 0,
    *, sort_window: int = 0,
) -> Iterator[Batch]:
    """Tokenize and right-pad batches of ``batch_size`` texts, from batch ``start_batch`` on.

    ``sort_window=0``: texts in file order. ``sort_window=n``: within each window of n batches,
    texts are sorted by token count (stable), so similar lengths share a batch. Either way batch k
    is the same in every run; windows before ``start_batch`` are skipped without tokenizing them.
    """
    excluded = tokens.excluded_token_ids(tokenizer, cfg.skip_special_tokens)
    pad_id = tokens.pad_id(tokenizer)
    window = cfg.batch_size * max(1, sort_window)
    first_batch = 0  # index of the window's first batch
    for w0 in range(0, len(texts), window):
        n_texts = min(window, len(texts) - w0)
        n_batches = -(-n_texts // cfg.batch_size)
        if first_batch + n_batches <= start_batch:
            first_batch += n_batches
            continue
        encoded = tokens.encode(tokenizer, texts[w0 : w0 + n_texts], cfg.context_length)
        order = np.arange(n_texts)
        if sort_window:
            order = np.argsort([len(e) for e in encoded], kind="stable")
        for k in range(max(0, start_batch - first_batch), n_batches):
            rows = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            yield _pad([encoded[r] for r in rows], ids[w0 + rows], pad_id, excluded)
        first_batch += n_batches


def _pad(encoded: list[list[int]], doc_ids: np.ndarray, pad_id: int, excluded: np.ndarray) -> Batch:
    keep = tokens.pad_right([~np.isin(e, excluded) for e in encoded], False, dtype=bool)
    return Batch(tokens.pad_right(encoded, pad_id), keep, doc_ids, tokens.lengths(encoded))


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, str]:
    """Name and content hash of a tokenizer (its serialized fast-tokenizer JSON)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return {"name": name, "hash": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def _texts_digest(ids: np.ndarray, texts: Sequence[str]) -> str:
    h = hashlib.sha256(np.ascontiguousarray(ids).tobytes())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _fingerprint(loaded: LoadedModel, cfg: ExtractConfig, split: str, texts_digest: str) -> dict[str, Any]:
    """Everything that decides the row stream (not max_tokens: a larger budget extends it)."""
    d = asdict(cfg)
    for k in ("max_tokens", "eval_max_tokens"):
        d.pop(k)
    return {"model_id": loaded.info.model_id, "model_hash": loaded.info.model_hash,
            "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "split": split,
            "texts_digest": texts_digest, **d}


def _reusable_shards(folder: Path, fingerprint: dict[str, Any], shard_rows: int) -> list[ShardInfo]:
    """Complete shards of an interrupted run with the same fingerprint whose checksums match."""
    path = folder / PROGRESS
    if not path.exists():
        return []
    progress = json.loads(path.read_text())
    if progress.get("fingerprint") != fingerprint:
        log.info("%s: settings changed since the interrupted run; starting over", folder)
        return []
    kept = []
    for i, entry in enumerate(progress.get("shards", [])):
        info = ShardInfo(**entry)
        shard = folder / info.file
        if (info.file != SHARD_PATTERN.format(i) or info.rows != shard_rows or not shard.exists()
                or file_sha256(shard) != info.sha256):
            break
        kept.append(info)
    return kept


def _clean(folder: Path, keep: set[str]) -> None:
    for path in folder.iterdir():
        if path.name in keep:
            continue
        if path.name.startswith("shard-") or path.name.endswith(".tmp") or path.name == MANIFEST:
            path.unlink()


def _write_progress(folder: Path, fingerprint: dict[str, Any], shards: list[ShardInfo]) -> None:
    body = {"fingerprint": fingerprint, "shards": [s._asdict() for s in shards]}
    atomic_write_bytes(folder / PROGRESS, json.dumps(body, indent=2).encode(), durable=True)


def _start_point(tokenizer: Any, ids: np.ndarray, texts: Sequence[str], cfg: ExtractConfig,
                 skip_rows: int) -> tuple[int, int]:
    """(first batch to run, rows of that batch to drop) so that ``skip_rows`` rows are skipped."""
    seen = 0
    for b, batch in enumerate(make_batches(tokenizer, ids, texts, cfg, sort_window=SORT_WINDOW_BATCHES)):
        rows = int(batch.keep.sum())
        if seen + rows > skip_rows:
            return b, skip_rows - seen
        seen += rows
    return len(texts), 0  # never reached when skip_rows < total rows


def extract_split(
    loaded: LoadedModel,
    texts_path: Path,
    out: Path,
    cfg: ExtractConfig,
    split: str = "train",
    *,
    max_shards: int | None = None,
    progress: bool = True,
    text_range: tuple[int, int] | None = None,
    max_rows: int | None = None,
) -> dict[str, Any] | None:
    """Write the shards and manifest of one split into ``out``; return the manifest.

    ``max_shards`` stops after writing that many new shards, leaving an unfinished (resumable)
    folder without manifest, and returns None (used to test resumption). ``text_range``: only the
    split's texts ``[start, stop)`` (one rank's share, ``saepipe.activations.ranked_extract``);
    ``max_rows``: the row budget instead of the config's.
    """
    site = check_site(cfg.layer, cfg.component, loaded.info.num_layers)
    ids, texts = read_split(Path(texts_path), split)
    if text_range is not None:
        ids, texts = ids[text_range[0] : text_range[1]], texts[text_range[0] : text_range[1]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(loaded, cfg, split, _texts_digest(ids, texts))
    max_rows = cfg.max_rows(split) if max_rows is None else max_rows

    done = _finished_manifest(out, fingerprint, max_rows)
    if done is not None:
        log.info("%s: already complete (%d rows)", out, done["n_tokens"])
        return done

    kept = [s for s in _reusable_shards(out, fingerprint, cfg.shard_rows)][: max_rows // cfg.shard_rows]
    _clean(out, {s.file for s in kept} | {PROGRESS})
    shards = list(kept)
    skip = len(kept) * cfg.shard_rows
    if kept:
        log.info("%s: resuming after %d complete shards (%d rows)", out, len(kept), skip)

    def on_shard(info: ShardInfo) -> None:
        shards.append(info)
        _write_progress(out, fingerprint, shards)
        if max_shards is not None and len(shards) - len(kept) >= max_shards:
            raise _Interrupted  # stop like a kill right after a shard landed

    writer = ShardWriter(out, loaded.info.d_model, dtype=cfg.dtype, shard_rows=cfg.shard_rows,
                         first_index=len(kept), on_shard=on_shard)
    written = skip
    start_batch, drop = _start_point(loaded.tokenizer, ids, texts, cfg, skip) if skip else (0, 0)
    bar = tqdm(total=max_rows, initial=written, unit="tok", unit_scale=True, disable=not progress,
               desc=f"extract {split} {site.name}")
    t0 = time.perf_counter()
    try:
        batches = make_batches(loaded.tokenizer, ids, texts, cfg, start_batch, sort_window=SORT_WINDOW_BATCHES)
        for rows in _run_batches(loaded, site, batches):
            acts, token_id, doc_id, position = (c[drop:] for c in rows)
            drop = 0
            check_storable(acts, cfg.dtype)
            n = min(len(acts), max_rows - written)
            writer.add(acts[:n], token_id[:n], doc_id[:n], position[:n])
            written += n
            bar.update(n)
            if written >= max_rows:
                break
        writer.close()
    except _Interrupted:
        return None
    finally:
        bar.close()
    if written < max_rows:
        log.warning("%s: the %s split has only %d token rows (asked for %d)", out, split, written, max_rows)
    if written == 0:
        raise ValueError(f"the {split} split produced no token rows (all texts empty or special tokens)")
    log.info("%s: %d rows in %.1fs", out, written, time.perf_counter() - t0)
    manifest = write_manifest(out, _manifest(loaded, cfg, site, split, fingerprint, shards, written, max_rows))
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


def _run_batches(loaded: LoadedModel, site: Site, batches: Iterator[Batch]) -> Iterator[tuple[np.ndarray, ...]]:
    """Per batch: the kept rows (acts float32, token_id, doc_id, position) in text/position order."""
    d_model = loaded.info.d_model
    for batch in batches:
        acts = forward(loaded.model, mx.array(batch.tokens), stop_layer=site.layer, capture=[site]).activations[site]
        acts = np.asarray(acts.astype(mx.float32))
        if acts.shape[-1] != d_model:
            raise ValueError(f"model activations have width {acts.shape[-1]} but the model info says "
                             f"d_model={d_model}")
        b_idx, pos = np.nonzero(batch.keep)
        yield (acts[b_idx, pos], batch.tokens[b_idx, pos], batch.doc_ids[b_idx], pos.astype(np.int32))


def check_storable(acts: np.ndarray, dtype: str) -> None:
    """Activations must be finite and, for float16 storage, within its range (|x| <= 65504)."""
    peak = float(np.abs(acts).max()) if acts.size else 0.0
    if not np.isfinite(peak):
        raise ValueError("the model produced non-finite activations (inf/nan)")
    if dtype == "float16" and peak > float(np.finfo(np.float16).max):
        raise ValueError(f"activations reach {peak:.4g}, beyond float16's range; set extract.dtype: float32")


def _finished_manifest(out: Path, fingerprint: dict[str, Any], max_rows: int) -> dict[str, Any] | None:
    """The existing manifest when it was made with the same settings and its shards are intact."""
    if not (out / MANIFEST).exists():
        return None
    try:
        manifest = read_manifest(out)
    except ValueError:
        return None
    if manifest.get("fingerprint") != fingerprint or manifest.get("max_rows") != max_rows:
        return None
    for entry in manifest["shards"]:
        path = out / entry["file"]
        if not path.exists() or file_sha256(path) != entry["sha256"]:
            return None
    return manifest


def _manifest(loaded: LoadedModel, cfg: ExtractConfig, site: Site, split: str,
              fingerprint: dict[str, Any], shards: list[ShardInfo], n_tokens: int,
              max_rows: int) -> dict[str, Any]:
    masking = "pad positions excluded"
    if cfg.skip_special_tokens:
        masking += "; BOS and special-token positions excluded"
    return {
        "model_id": loaded.info.model_id,
        "model_hash": loaded.info.model_hash,
        "layer": site.layer,
        "component": site.component,
        "site": site.name,
        "d_model": loaded.info.d_model,
        "dtype": cfg.dtype,
        "n_tokens": n_tokens,
        "max_rows": max_rows,
        "context_length": cfg.context_length,
        "batch_size": cfg.batch_size,
        "shard_rows": cfg.shard_rows,
        "masking": masking,
        "skip_special_tokens": cfg.skip_special_tokens,
        "tokenizer": fingerprint["tokenizer"],
        "texts_digest": fingerprint["texts_digest"],
        "split": split,
        "saepipe_version": __version__,
        "fingerprint": fingerprint,
        "shards": [s._asdict() for s in shards],
    }


def split_fingerprint(loaded: LoadedModel, cfg: ExtractConfig, split: str, ids: np.ndarray,
                      texts: Sequence[str]) -> dict[str, Any]:
    """The fingerprint ``extract_split`` records for these texts of ``split`` (what decides its rows)."""
    return _fingerprint(loaded, cfg, split, _texts_digest(ids, texts))


def finished_manifest(out: Path, fingerprint: dict[str, Any], max_rows: int) -> dict[str, Any] | None:
    """``out``'s manifest when it was made with ``fingerprint`` and ``max_rows`` and its shards are intact."""
    return _finished_manifest(Path(out), fingerprint, max_rows)


def extract(loaded: LoadedModel, texts_path: Path, out: Path, cfg: ExtractConfig,
            *, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Extract both splits into ``out/train`` and ``out/eval``; return their manifests."""
    result = {}
    for split in SPLITS:
        manifest = extract_split(loaded, texts_path, Path(out) / split, cfg, split, progress=progress)
        assert manifest is not None
        result[split] = manifest
    return result
