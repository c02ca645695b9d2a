"""Extract activations of one or several sites for the prepared texts into resumable shard folders.

Texts of a split are tokenized (``tokenizer.encode``, with the tokenizer's BOS policy), truncated
to ``context_length``, sorted by length within windows of consecutive texts (stable, so the order
is deterministic), grouped into batches of ``batch_size`` texts (right padded to the longest text
of the batch) and run once through ``forward(stop_layer=deepest layer, capture=sites)``: every site
is read from the same pass, so N sites cost one forward to the deepest of them plus N writes. Each
site has its own shard folder and manifest, with exactly the rows a one-site extraction of it
writes (the row stream depends on the texts and settings, not on which other sites ride along).
Rows are stored text by text in batch order, positions in order (``doc_id``/``position`` columns
say where each row came from); pad positions are never stored, nor BOS/special tokens when
``skip_special_tokens``. Writing stops at ``max_tokens`` rows.

Because the batches are a fixed function of the texts, a rerun after an interruption keeps the complete
shards whose checksums match (listed in each folder's ``_progress.json``; with several sites, the
count all of them have), skips the texts they cover without running the model on them, and writes
exactly what an uninterrupted run would have written. A site whose folder is already complete for
the same settings is not run again (adding a site to a sweep runs the model for the new one only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
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
from saepipe.lm.sites import Site, check_site, parse_site_id
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


def _fingerprint(loaded: LoadedModel, cfg: ExtractConfig, site: Site, split: str,
                 texts_digest: str) -> dict[str, Any]:
    """Everything that decides a site's rows (not max_tokens: a larger budget extends them). The
    same keys as before sites moved out of ``ExtractConfig``, so older folders stay reusable."""
    d = asdict(cfg)
    for k in ("max_tokens", "eval_max_tokens"):
        d.pop(k)
    return {"model_id": loaded.info.model_id, "model_hash": loaded.info.model_hash,
            "tokenizer": tokenizer_fingerprint(loaded.tokenizer), "split": split,
            "texts_digest": texts_digest, "layer": site.layer, "component": site.component, **d}


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


class PassStats(NamedTuple):
    """What one split's extraction did (``extract`` records it in ``extract.json``)."""

    sites_run: list[str]
    """Sites captured by this run's forward pass (ids, e.g. ``6.mlp``)."""
    sites_reused: list[str]
    """Sites whose folders were already complete for these settings (not run)."""
    stop_layer: int | None
    """Deepest block the pass ran (None when nothing ran)."""
    batches: int
    """Forward passes (batches) run: one per batch for all ``sites_run`` together."""
    rows: int
    """Rows written per site by this run (resumed shards not counted)."""
    seconds: float


def extract_split(
    loaded: LoadedModel,
    texts_path: Path,
    out: Path,
    cfg: ExtractConfig,
    split: str = "train",
    *,
    site: Site | tuple[int, str] | str,
    max_shards: int | None = None,
    progress: bool = True,
    text_range: tuple[int, int] | None = None,
    max_rows: int | None = None,
) -> dict[str, Any] | None:
    """Write the shards and manifest of one site's split into ``out``; return the manifest.

    ``site``: a ``Site``, a ``(layer, component)`` pair or an id such as ``"6.mlp"``.
    ``max_shards`` stops after writing that many new shards, leaving an unfinished (resumable)
    folder without manifest, and returns None (used to test resumption). ``text_range``: only the
    split's texts ``[start, stop)`` (one rank's share, ``saepipe.activations.ranked_extract``);
    ``max_rows``: the row budget instead of the config's.
    """
    site = parse_site_id(site) if isinstance(site, str) else Site(*site)
    manifests = extract_sites(loaded, texts_path, {site: out}, cfg, split, max_shards=max_shards,
                              progress=progress, text_range=text_range, max_rows=max_rows)
    return None if manifests is None else manifests[0][site]


def extract_sites(
    loaded: LoadedModel,
    texts_path: Path,
    outs: dict[Site, Path],
    cfg: ExtractConfig,
    split: str = "train",
    *,
    max_shards: int | None = None,
    progress: bool = True,
    text_range: tuple[int, int] | None = None,
    max_rows: int | None = None,
) -> tuple[dict[Site, dict[str, Any]], PassStats] | None:
    """Write one split of several sites, each into its folder of ``outs``, from one forward pass per
    batch (to the deepest site); return each site's manifest and what the pass did.

    Sites already complete for these settings are not run. ``max_shards`` stops (like a kill) as
    soon as any site has written that many new shards, leaving resumable folders, and returns None.
    ``text_range`` and ``max_rows``: as in ``extract_split``.
    """
    outs = {check_site(s[0], s[1], loaded.info.num_layers): Path(o) for s, o in outs.items()}
    if not outs:
        raise ValueError("no sites to extract")
    ids, texts = read_split(Path(texts_path), split)
    if text_range is not None:
        ids, texts = ids[text_range[0] : text_range[1]], texts[text_range[0] : text_range[1]]
    digest = _texts_digest(ids, texts)
    max_rows = cfg.max_rows(split) if max_rows is None else max_rows
    fingerprints = {site: _fingerprint(loaded, cfg, site, split, digest) for site in outs}

    manifests: dict[Site, dict[str, Any]] = {}
    for site, out in outs.items():
        out.mkdir(parents=True, exist_ok=True)
        done = _finished_manifest(out, fingerprints[site], max_rows)
        if done is not None:
            log.info("%s: already complete (%d rows)", out, done["n_tokens"])
            manifests[site] = done
    todo = [site for site in outs if site not in manifests]
    reused = [site.id for site in outs if site in manifests]
    if not todo:
        return manifests, PassStats([], reused, None, 0, 0, 0.0)

    # Resume from the shard count every unfinished site has (they land together, so they differ by
    # at most the one a kill interrupted); a site ahead drops its extra shards.
    kept = {site: _reusable_shards(outs[site], fingerprints[site], cfg.shard_rows)[: max_rows // cfg.shard_rows]
            for site in todo}
    n_kept = min(len(k) for k in kept.values())
    shards: dict[Site, list[ShardInfo]] = {}
    for site in todo:
        shards[site] = kept[site][:n_kept]
        _clean(outs[site], {s.file for s in shards[site]} | {PROGRESS})
    skip = n_kept * cfg.shard_rows
    if n_kept:
        log.info("%s: resuming after %d complete shards (%d rows)", ", ".join(s.id for s in todo), n_kept, skip)

    def on_shard(site: Site) -> Any:
        def record(info: ShardInfo) -> None:
            shards[site].append(info)
            _write_progress(outs[site], fingerprints[site], shards[site])
            if max_shards is not None and len(shards[site]) - n_kept >= max_shards:
                raise _Interrupted  # stop like a kill right after a shard landed
        return record

    writers = {site: ShardWriter(outs[site], loaded.info.d_model, dtype=cfg.dtype, shard_rows=cfg.shard_rows,
                                 first_index=n_kept, on_shard=on_shard(site)) for site in todo}
    written = skip
    start_batch, drop = _start_point(loaded.tokenizer, ids, texts, cfg, skip) if skip else (0, 0)
    names = todo[0].name if len(todo) == 1 else f"{len(todo)} sites"
    bar = tqdm(total=max_rows, initial=written, unit="tok", unit_scale=True, disable=not progress,
               desc=f"extract {split} {names}")
    t0 = time.perf_counter()
    n_batches = 0
    try:
        batches = make_batches(loaded.tokenizer, ids, texts, cfg, start_batch, sort_window=SORT_WINDOW_BATCHES)
        for acts, token_id, doc_id, position in _run_batches(loaded, todo, batches):
            n_batches += 1
            n = min(len(token_id) - drop, max_rows - written)
            for site in todo:
                rows = acts[site][drop:]
                check_storable(rows, cfg.dtype)
                writers[site].add(rows[:n], token_id[drop:drop + n], doc_id[drop:drop + n], position[drop:drop + n])
            drop = 0
            written += n
            bar.update(n)
            if written >= max_rows:
                break
        for writer in writers.values():
            writer.close()
    except _Interrupted:
        return None
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if written < max_rows:
        log.warning("%s: the %s split has only %d token rows (asked for %d)", names, split, written, max_rows)
    if written == 0:
        raise ValueError(f"the {split} split produced no token rows (all texts empty or special tokens)")
    log.info("%s %s: %d rows per site in %.1fs", split, names, written, seconds)
    for site in todo:
        out = outs[site]
        manifests[site] = write_manifest(out, _manifest(loaded, cfg, site, split, fingerprints[site], shards[site],
                                                        written, max_rows))
        (out / PROGRESS).unlink(missing_ok=True)
    stats = PassStats([s.id for s in todo], reused, max(s.layer for s in todo), n_batches, written - skip, seconds)
    return {site: manifests[site] for site in outs}, stats


def _run_batches(loaded: LoadedModel, sites: list[Site], batches: Iterator[Batch]
                 ) -> Iterator[tuple[dict[Site, np.ndarray], np.ndarray, np.ndarray, np.ndarray]]:
    """Per batch, one forward pass to the deepest site: the kept rows of each site (float32) and
    their token_id, doc_id, position, in text/position order."""
    d_model = loaded.info.d_model
    stop = max(site.layer for site in sites)
    for batch in batches:
        captured = forward(loaded.model, mx.array(batch.tokens), stop_layer=stop, capture=sites).activations
        b_idx, pos = np.nonzero(batch.keep)
        acts = {}
        for site in sites:
            a = np.asarray(captured[site].astype(mx.float32))
            if a.shape[-1] != d_model:
                raise ValueError(f"model activations have width {a.shape[-1]} but the model info says "
                                 f"d_model={d_model}")
            acts[site] = a[b_idx, pos]
        yield acts, batch.tokens[b_idx, pos], batch.doc_ids[b_idx], pos.astype(np.int32)


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


def split_fingerprint(loaded: LoadedModel, cfg: ExtractConfig, site: Site, split: str, ids: np.ndarray,
                      texts: Sequence[str]) -> dict[str, Any]:
    """The fingerprint ``extract_split`` records for ``site`` and these texts of ``split`` (what
    decides its rows)."""
    return _fingerprint(loaded, cfg, Site(*site), split, _texts_digest(ids, texts))


def finished_manifest(out: Path, fingerprint: dict[str, Any], max_rows: int) -> dict[str, Any] | None:
    """``out``'s manifest when it was made with ``fingerprint`` and ``max_rows`` and its shards are intact."""
    return _finished_manifest(Path(out), fingerprint, max_rows)


PASS_FILE = "extract.json"
"""What the last ``extract`` run did per split (sites run and reused, batches, seconds), next to the site folders."""


def prepare_site_folders(out: Path, sites: list[Site]) -> None:
    """Make ``out`` hold only the folders of ``sites`` (and ``extract.json``): folders of sites no
    longer listed are removed (a DVC output keeps them in its cache), and a one-site folder of the
    layout before sweeps (``out/train``, ``out/eval``) is moved to its site's place, so upgrading
    does not extract again (its manifest is then checked like any other)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _adopt_flat_layout(out, sites)
    keep = {s.id for s in sites} | {PASS_FILE}
    for path in out.iterdir():
        if path.name not in keep:
            log.info("%s: not a listed site; removed", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def extract(loaded: LoadedModel, texts_path: Path, out: Path, cfg: ExtractConfig, sites: list[Site],
            *, progress: bool = True) -> dict[Site, dict[str, dict[str, Any]]]:
    """Extract both splits of every site into ``out/<site id>/{train,eval}`` (one forward pass per
    batch for all sites, ``extract_sites``); return the manifests by site and split. ``out`` is
    first tidied by ``prepare_site_folders``; ``out/extract.json`` records what each split's pass did.
    """
    out = Path(out)
    sites = [check_site(s[0], s[1], loaded.info.num_layers) for s in sites]
    prepare_site_folders(out, sites)
    result: dict[Site, dict[str, dict[str, Any]]] = {site: {} for site in sites}
    passes = {}
    for split in SPLITS:
        done = extract_sites(loaded, texts_path, {s: out / s.id / split for s in sites}, cfg, split,
                             progress=progress)
        assert done is not None
        manifests, stats = done
        for site, manifest in manifests.items():
            result[site][split] = manifest
        passes[split] = stats._asdict()
    write_passes(out, passes)
    return result


def write_passes(out: Path, passes: dict[str, dict[str, Any]]) -> None:
    """``out/extract.json``: per split, what the pass did (``PassStats`` as a dict)."""
    atomic_write_bytes(Path(out) / PASS_FILE, json.dumps(passes, indent=2).encode())


def _adopt_flat_layout(out: Path, sites: list[Site]) -> None:
    """Move ``out/{train,eval}`` (one site, the layout before sweeps) to ``out/<site id>/`` when that
    site is listed and has no folder yet; extract_sites then checks its fingerprint as usual."""
    for split in SPLITS:
        old = out / split
        if not (old / MANIFEST).is_file():
            continue
        try:
            manifest = json.loads((old / MANIFEST).read_text())
            site = Site(int(manifest["layer"]), str(manifest["component"]))
        except (ValueError, KeyError, TypeError):
            continue
        new = out / site.id / split
        if site in sites and not new.exists():
            new.parent.mkdir(parents=True, exist_ok=True)
            old.rename(new)
            log.info("%s: moved to %s (the per-site layout)", old, new)
