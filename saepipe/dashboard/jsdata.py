"""Deterministic, compact serialisation of the site's data files.

Data reaches the pages as JavaScript files (``<script src>`` works from ``file://``, ``fetch`` does
not), each one call into the page's registry: ``SAE.block(3, {...});``. Numbers are rounded to a few
significant digits so the files stay small and the same input always gives the same bytes; the
activations and token ids of example contexts travel as base64 of little-endian binary arrays (exact
float32, and compact: the pages decode only the latent on screen).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np


def round_sig(values: Any, sig: int = 4) -> list[float | None]:
    """Floats rounded to ``sig`` significant digits, as Python floats whose ``repr`` is the short
    decimal (e.g. 2.351, not 2.3510000000000004); non-finite values become ``None``.

    Exact: the rounded mantissa is an integer-valued double, and dividing or multiplying it by an exact
    power of ten is correctly rounded, so the result is the double nearest to the decimal.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    out = np.zeros_like(x)
    finite = np.isfinite(x)
    nz = finite & (x != 0)
    if nz.any():
        v = x[nz]
        shift = (sig - 1) - np.floor(np.log10(np.abs(v))).astype(np.int64)
        res = np.empty_like(v)
        pos = shift >= 0
        if pos.any():
            p = np.power(10.0, shift[pos])
            res[pos] = np.round(v[pos] * p) / p
        if (~pos).any():
            p = np.power(10.0, -shift[~pos])
            res[~pos] = np.round(v[~pos] / p) * p
        out[nz] = res
    result: list[float | None] = out.tolist()
    if not finite.all():
        for i in np.flatnonzero(~finite):
            result[i] = None
    return result


def round1(value: Any, sig: int = 4) -> float | None:
    if value is None:
        return None
    v = float(value)
    return round_sig([v], sig)[0] if math.isfinite(v) else None


def b64(array: np.ndarray, dtype: str) -> str:
    """Base64 of ``array`` as the little-endian ``dtype`` ('<f4', '<u2', '<u4')."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def dumps(obj: Any) -> str:
    """Compact JSON that is also a valid JavaScript expression (U+2028/2029 escaped), with non-ASCII
    text kept as UTF-8. NaN and infinities are rejected: callers round through :func:`round_sig`."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def js_call(fn: str, *args: Any) -> str:
    """``SAE.<fn>(<args as JSON>);`` plus a newline: the body of one data file."""
    return f"SAE.{fn}({','.join(dumps(a) for a in args)});\n"
