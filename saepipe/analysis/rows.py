"""Token rows to analyze: activations with the token id and document of every row.

A ``RowSource`` serves one split's rows in storage order, in chunks: the shard folders of ``extract``
(``ShardRows``: memory-mapped, nothing but the current chunk in memory) or arrays already in memory
(``ArrayRows``: what the Python API builds from a list of texts). Rows of one document must be
contiguous (extract stores texts one after the other), so a context window is a run of rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import mlx.core as mx
import numpy as np

from saepipe.activations.shards import ShardSource
from saepipe.lm.forward import forward, unwrap_model
from saepipe.lm.sites import Site
from saepipe.lm.tokens import excluded_token_ids, tokenize_padded


class RowChunk(NamedTuple):
    acts: np.ndarray
    """(n, d_model) float32 activations."""
    token_id: np.ndarray
    """(n,) int32 token id of each row."""
    doc_id: np.ndarray
    """(n,) int64 document (text) of each row."""


class RowSource(Protocol):
    """One split's rows, in storage order."""

    split: str

    @property
    def n_rows(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    def chunks(self, chunk_rows: int) -> Iterator[RowChunk]:
        """All rows in order, at most ``chunk_rows`` at a time."""
        ...


class ShardRows:
    """The shard folder of one split (``data/extract/<split>``)."""

    def __init__(self, folder: str | Path, split: str | None = None) -> None:
        self.folder = Path(folder)
        self.shards = ShardSource(self.folder)
        self.split = split or str(self.shards.manifest.get("split") or self.folder.name)

    @property
    def manifest(self) -> dict:
        return self.shards.manifest

    @property
    def n_rows(self) -> int:
        return self.shards.n_rows

    @property
    def d_model(self) -> int:
        return self.shards.d_model

    def chunks(self, chunk_rows: int) -> Iterator[RowChunk]:
        for acts, meta in self.shards.chunks_with_meta(chunk_rows):
            yield RowChunk(acts, meta["token_id"], meta["doc_id"])


class ArrayRows:
    """Rows held in memory: ``acts`` (n, d_model), ``token_id`` (n,), ``doc_id`` (n,)."""

    def __init__(self, acts: np.ndarray, token_id: np.ndarray, doc_id: np.ndarray, split: str = "texts") -> None:
        acts = np.asarray(acts)
        if acts.ndim != 2 or len(acts) != len(token_id) or len(acts) != len(doc_id):
            raise ValueError(f"acts {acts.shape}, token_id {np.shape(token_id)} and doc_id {np.shape(doc_id)} "
                             "must be (n, d_model), (n,) and (n,)")
        self.acts = acts
        self.token_id = np.asarray(token_id, dtype=np.int32)
        self.doc_id = np.asarray(doc_id, dtype=np.int64)
        self.split = split

    @property
    def n_rows(self) -> int:
        return int(self.acts.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.acts.shape[1])

    def chunks(self, chunk_rows: int) -> Iterator[RowChunk]:
        for a in range(0, self.n_rows, chunk_rows):
            b = a + chunk_rows
            yield RowChunk(np.asarray(self.acts[a:b], dtype=np.float32), self.token_id[a:b], self.doc_id[a:b])


def rows_from_texts(model: Any, site: Site, texts: Sequence[str], *, context_length: int = 128,
                    batch_size: int = 8, skip_special_tokens: bool = True, split: str = "texts") -> ArrayRows:
    """The model's activations at ``site`` for every token of ``texts``, as extract stores them:
    texts cut to ``context_length`` tokens (BOS included), pads never kept, BOS and special tokens
    skipped when ``skip_special_tokens``; ``doc_id`` is the text's index in ``texts``."""
    tokenizer = model.tokenizer
    module = unwrap_model(model)
    excluded = excluded_token_ids(tokenizer, skip_special_tokens)
    acts, tok, doc = [], [], []
    for a in range(0, len(texts), batch_size):
        ids, lengths = tokenize_padded(tokenizer, texts[a : a + batch_size], context_length)
        keep = (np.arange(ids.shape[1])[None, :] < lengths[:, None]) & ~np.isin(ids, excluded)
        out = forward(module, mx.array(ids), stop_layer=site.layer, capture=[site]).activations[site]
        out = np.asarray(out.astype(mx.float32))
        b, pos = np.nonzero(keep)
        acts.append(out[b, pos])
        tok.append(ids[b, pos])
        doc.append(a + b)
    d = int(model.info.d_model) if hasattr(model, "info") else int(acts[0].shape[-1])
    if not acts or not sum(len(x) for x in acts):
        return ArrayRows(np.zeros((0, d), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64), split)
    return ArrayRows(np.concatenate(acts), np.concatenate(tok), np.concatenate(doc), split)


__all__ = ["ArrayRows", "RowChunk", "RowSource", "ShardRows", "rows_from_texts"]
