"""Fast float32 elementwise math for MLX on CPU, where ``mx.exp`` runs slowly on one core: a
Cody-Waite range reduction + degree-6 polynomial exp (max relative error ~4e-7, i.e. float32
rounding) from plain elementwise ops, several times faster once compiled (docs/performance.md).
Used by the forward pass (SwiGLU, attention softmax) and by evaluate's vocabulary-wide CE/KL.
"""

from __future__ import annotations

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so n * _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.428606765330187e-06


def exp(x: mx.array) -> mx.array:
    """exp(x) in float32 to ~1 ulp; inputs are clipped to [-87, 88] (result ~0 / max finite)."""
    x = mx.clip(x, -87.0, 88.0)
    n = mx.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln2 / 2
    p = r * 1.9875691500e-4 + 1.3981999507e-3
    p = p * r + 8.3334519073e-3
    p = p * r + 4.1665795894e-2
    p = p * r + 1.6666665459e-1
    p = p * r + 5.0000001201e-1
    p = p * r * r + r + 1.0
    two_n = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)  # 2^n from its exponent bits
    return p * two_n


@mx.compile  # per input shape: `view` (in exp) cannot be shapeless; retracing is cheap
def log_softmax_parts(logits: mx.array) -> tuple[mx.array, mx.array]:
    """``(logsumexp(z), softmax(z))`` over the last axis of float32 logits, with the fast exp."""
    top = mx.max(logits, axis=-1, keepdims=True)
    e = exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    return (top + mx.log(total))[..., 0], e / total


@mx.compile  # per input shape, as above
def logsumexp(logits: mx.array) -> mx.array:
    """``logsumexp(z)`` over the last axis of float32 logits, with the fast exp."""
    top = mx.max(logits, axis=-1, keepdims=True)
    return (top + mx.log(exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]
