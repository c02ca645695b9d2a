"""Scoring the held-out rows at each epoch end: ``val/loss``, ``val/fvu``, ``val/mse``, ``val/l0``,
``val/dead_fraction`` (latents that never fired on the validation rows).

Sums are accumulated in float64 over chunks of rows, so the result does not depend on the chunking
beyond rounding; FVU divides by the variance of all validation rows, not a per-chunk one. With
several ranks each scores its part of the rows and the sums are added over the ranks (``sum64``:
the same metrics on every rank).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from saepipe.activations.sources import ActivationSource
from saepipe.parallel.ranks import Ranks
from saepipe.sae.config import SAEConfig
from saepipe.sae.sparse import decode_rows, topk
from saepipe.training import reference
from saepipe.training.state import VARIANCE_FLOOR, fired_counts

MAX_CHUNK_ROWS = 8192
"""Validation rows per compiled call, at most (bounds the (rows, d_hidden) pre-activations)."""


def make_eval(config: SAEConfig, d_hidden: int, kernels: str = "sparse") -> Callable:
    """Compiled validation chunk: ``(sums, sum x, fired)`` with sums = (sse, sum ||x||^2, sum L0, sum L1).

    ``kernels="reference"`` decodes like the reference step (dense codes); the others like the
    fast steps (sparse gather).
    """
    tied = config.tied_weights
    if kernels == "reference":
        def encode_decode(xc, W_enc, b_enc, W_dec):
            values, indices, _, _ = reference.encode_select(xc, W_enc, b_enc, config.k, None, 0)
            return values, indices, reference.decode(values, indices, W_dec)
    else:
        def encode_decode(xc, W_enc, b_enc, W_dec):
            values, indices = topk(nn.relu(xc @ W_enc.T + b_enc), config.k)
            return values, indices, decode_rows(values, indices, W_dec)

    def evaluate(params, x, mean, std):
        x = (x - mean) / std
        W_enc = params["W_dec"] if tied else params["W_enc"]
        values, indices, x_hat = encode_decode(x - params["b_dec"], W_enc, params["b_enc"], params["W_dec"])
        e = x - (x_hat + params["b_dec"])
        sums = mx.stack([mx.square(e).sum(), mx.square(x).sum(),
                         (values > 0).sum().astype(mx.float32), values.sum()])
        return sums, x.sum(axis=0), fired_counts(indices, values, d_hidden)

    return mx.compile(evaluate)


def validate(source: ActivationSource, rows: np.ndarray, evaluate: Callable, params: dict, mean: mx.array,
             std: mx.array, d_hidden: int, config: SAEConfig, ranks: Ranks | None = None) -> dict[str, float]:
    """The ``val/*`` metrics of ``params`` on ``rows`` of ``source``; {} when there are none.
    ``ranks`` (several): this rank scores its part of ``rows``; every rank returns the metrics of all."""
    if len(rows) == 0:
        return {}
    ranks = ranks or Ranks()
    sse = sq = l0 = l1 = 0.0
    total = np.zeros(source.d_model)
    fired = np.zeros(d_hidden, dtype=np.int64)
    chunk = max(1, min(config.batch_size, MAX_CHUNK_ROWS))
    mine = ranks.part(rows)
    for start in range(0, len(mine), chunk):
        x = source.take(mine[start : start + chunk])
        if not np.isfinite(x).all():
            bad = mine[start + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])]
            raise ValueError(f"the validation rows hold NaN or inf (row {bad} of the activations): fix the input "
                             "(check the model and the extract stage)")
        sums, xsum, f = evaluate(params, mx.array(x), mean, std)
        s = np.array(sums, dtype=np.float64)
        sse, sq, l0, l1 = sse + s[0], sq + s[1], l0 + s[2], l1 + s[3]
        total += np.array(xsum, dtype=np.float64)
        fired += np.array(f)
    if ranks.distributed:
        sse, sq, l0, l1, total, fired = ranks.sum64(sse, sq, l0, l1, total, fired)
    n = len(rows)
    total_var = max(sq - float(total @ total) / n, VARIANCE_FLOOR)
    fvu = float(sse / total_var)
    return {"val/loss": fvu + config.l1_coefficient * float(l1) / n, "val/mse": float(sse) / (n * source.d_model),
            "val/fvu": fvu, "val/l0": float(l0) / n, "val/dead_fraction": float((fired == 0).mean())}


__all__ = ["MAX_CHUNK_ROWS", "make_eval", "validate"]
