"""One block-wise forward pass for extract, trace and evaluate, with capture and edit of component outputs.

``forward`` runs an mlx-lm Llama-style model block by block::

    h = embed(tokens)
    for block in layers:
        attn = block.self_attn(block.input_layernorm(h), mask)   # site (i, "attn")
        h = h + attn
        mlp = block.mlp(block.post_attention_layernorm(h))       # site (i, "mlp")
        h = h + mlp                                              # site (i, "output")
    logits = lm_head(norm(h))

so each component output can be read (``capture``) or replaced (``edit``: the function's return value
is what flows on). The mask is causal, so with right padding the pads after a text never change the
text's own positions. The arithmetic is the same as mlx-lm's ``model(tokens)`` (tested) with two CPU
speed-ups: SwiGLU and the attention softmax run as compiled kernels with a polynomial exp (MLX's CPU
exp is slow), and batches are split over one MLX stream per core with single-threaded OpenBLAS, so
MLX's one-core elementwise kernels run on every core. benchmarks/extract.py compares it with
mlx-lm's own blocks (results: docs/performance.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

from saepipe.lm.fastmath import exp as _exp
from saepipe.lm.sites import Site, check_site
from saepipe.runtime import blas_threads

Edit = Callable[[mx.array], mx.array]


class Replace(NamedTuple):
    """Edit: ``value`` where ``where`` is True, the component's own output elsewhere.

    Unlike a plain function it can be sliced by batch rows, so edited forwards can still be split
    over per-core streams (see ``forward``'s ``parallel``).
    """

    where: mx.array
    """(B, T, 1) or (B, T, d_model) bool: positions to replace."""
    value: mx.array
    """(d_model,) or (1, 1, d_model) (same for every position) or (B, T, d_model) replacement."""

    def __call__(self, out: mx.array) -> mx.array:
        return mx.where(self.where, self.value.astype(out.dtype), out)

    def rows(self, a: int, b: int) -> Replace:
        """The edit of batch rows a:b."""
        value = self.value[a:b] if self.value.ndim == 3 and self.value.shape[0] > 1 else self.value
        return Replace(self.where[a:b], value)


class Add(NamedTuple):
    """Edit: the component's output plus ``delta`` (a steering vector). Sliceable by batch rows like
    ``Replace``; adding an all-zero ``delta`` leaves the output bit-identical."""

    delta: mx.array
    """(d_model,) (every position) or (1 | B, T, d_model) (per position; 0 where nothing is added)."""

    def __call__(self, out: mx.array) -> mx.array:
        return out + self.delta.astype(out.dtype)

    def rows(self, a: int, b: int) -> Add:
        """The edit of batch rows a:b."""
        return Add(self.delta[a:b] if self.delta.ndim == 3 and self.delta.shape[0] > 1 else self.delta)


class Chain(NamedTuple):
    """Several edits of one site, applied in order (each gets the previous one's result)."""

    edits: tuple[Edit, ...]

    def __call__(self, out: mx.array) -> mx.array:
        for fn in self.edits:
            out = fn(out)
        return out

    def rows(self, a: int, b: int) -> Chain:
        """The edit of batch rows a:b (every edit in the chain must have ``rows``)."""
        return Chain(tuple(fn.rows(a, b) for fn in self.edits))  # type: ignore[attr-defined]

    @property
    def splittable(self) -> bool:
        return all(hasattr(fn, "rows") for fn in self.edits)


def chain(edits: Sequence[Edit]) -> Edit:
    """One edit doing ``edits`` in order (the edit itself when there is one)."""
    edits = tuple(edits)
    if not edits:
        raise ValueError("chain needs at least one edit")
    return edits[0] if len(edits) == 1 else Chain(edits)


class ForwardOutput(NamedTuple):
    logits: mx.array | None
    """(B, T, vocab) logits, or None when the pass stopped early (``stop_layer``)."""
    activations: dict[Site, mx.array]
    """Captured (B, T, d_model) component outputs by site (after any edit at that site)."""


def unwrap_model(model: Any) -> Any:
    """The mlx-lm ``nn.Module`` of a ``LoadedModel`` (or the module itself)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "tokenizer") and hasattr(model, "info"):
        return inner
    return model


def num_layers(model: Any) -> int:
    """How many transformer blocks the model has."""
    return len(unwrap_model(model).model.layers)


def _check_sites(
    sites: Sequence[Site], n_layers: int, stop_layer: int | None, what: str
) -> list[Site]:
    checked = []
    for site in sites:
        site = check_site(site[0], site[1], n_layers)
        if stop_layer is not None and site.layer > stop_layer:
            raise ValueError(f"{what} site {site} is after stop_layer={stop_layer}; it would never run")
        checked.append(site)
    return checked


def forward(
    model: Any,
    tokens: mx.array,
    *,
    stop_layer: int | None = None,
    capture: Sequence[Site] = (),
    edit: Mapping[Site, Edit] | None = None,
    parallel: bool | None = None,
    start_layer: int = 0,
    start_residual: mx.array | None = None,
) -> ForwardOutput:
    """Run ``model`` on ``tokens`` (B, T) block by block, capturing and/or editing component outputs.

    ``stop_layer``: run blocks 0..stop_layer only (no final norm / LM head; logits None).
    ``capture``: sites whose (B, T, d_model) outputs are returned in ``activations``.
    ``edit``: per site, a function of the component output (B, T, d_model) returning its replacement.
    ``parallel``: on CPU, split the batch over one MLX stream per core with single-threaded BLAS
    (MLX's elementwise kernels use one core each; see ``_parallel_parts``); None = when it applies,
    i.e. every edit can be sliced by rows (a ``Replace``, or anything with a ``rows(a, b)`` method).
    Split results are returned evaluated, otherwise they are lazy arrays.
    ``start_layer``, ``start_residual``: resume a pass from the (B, T, d_model) residual stream that
    enters block ``start_layer`` (e.g. the captured ``(start_layer - 1, "output")`` of an earlier
    pass on the same tokens), skipping the embedding and blocks before it. ``tokens`` still gives
    the batch shape. Sites before ``start_layer`` cannot be captured or edited.
    """
    module = unwrap_model(model)
    n_layers = len(module.model.layers)
    if stop_layer is not None:
        stop_layer = check_site(stop_layer, "output", n_layers).layer
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a (batch, seq) array, got shape {tokens.shape}")
    capture_sites = _check_sites(list(capture), n_layers, stop_layer, "capture")
    edits = dict(zip(_check_sites(list(edit or {}), n_layers, stop_layer, "edit"),
                     (edit or {}).values(), strict=True))
    start = _check_start(start_layer, start_residual, tokens.shape, n_layers, stop_layer,
                         [*capture_sites, *edits])
    splittable = all(getattr(fn, "splittable", hasattr(fn, "rows")) for fn in edits.values())
    parts = _parallel_parts(tokens.shape[0]) if parallel is not False and splittable else 1
    if parts < 2:
        return _run(module, tokens, stop_layer, set(capture_sites), edits, start)
    return _run_split(module, tokens, stop_layer, set(capture_sites), edits, start, parts)


class _Start(NamedTuple):
    layer: int
    residual: mx.array | None


def _check_start(layer: int, residual: mx.array | None, shape: tuple[int, ...], n_layers: int,
                 stop_layer: int | None, sites: list[Site]) -> _Start:
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(f"start_layer must be an int in [0, {n_layers}), got {layer!r}")
    if layer > 0 and residual is None:
        raise ValueError(f"start_layer={layer} needs start_residual (the residual entering that block)")
    if stop_layer is not None and layer > stop_layer:
        raise ValueError(f"start_layer={layer} is after stop_layer={stop_layer}")
    if residual is not None and tuple(residual.shape[:2]) != tuple(shape):
        raise ValueError(f"start_residual must be (batch, seq, d_model) = {tuple(shape)} + (d,), "
                         f"got {tuple(residual.shape)}")
    early = [s for s in sites if s.layer < layer]
    if early:
        raise ValueError(f"site {early[0]} is before start_layer={layer}; it would never run")
    return _Start(layer, residual)


def _run(module: Any, tokens: mx.array, stop_layer: int | None, capture_sites: set[Site],
         edits: dict[Site, Edit], start: _Start, cache: list[Any] | None = None) -> ForwardOutput:
    """The block loop (lazy, on the current stream); with ``cache``, attention runs through mlx-lm's
    own modules on the KV cache (see ``forward_cached``)."""
    activations: dict[Site, mx.array] = {}

    def site_out(layer: int, component: str, x: mx.array) -> mx.array:
        site = Site(layer, component)
        fn = edits.get(site)
        if fn is not None:
            x = fn(x)
        if site in capture_sites:
            activations[site] = x
        return x

    layers = module.model.layers
    h = module.model.embed_tokens(tokens) if start.residual is None else start.residual
    last = len(layers) - 1 if stop_layer is None else stop_layer
    mask = None if cache is None else create_attention_mask(h, cache[0])
    for i in range(start.layer, last + 1):
        block = layers[i]
        x = block.input_layernorm(h)
        attn = _attention(block.self_attn, x) if cache is None else block.self_attn(x, mask=mask, cache=cache[i])
        attn = site_out(i, "attn", attn)
        h = h + attn
        if i == stop_layer and not {Site(i, "mlp"), Site(i, "output")} & (capture_sites | set(edits)):
            break  # only the attention output of the last block is wanted
        mlp = site_out(i, "mlp", _mlp(block.mlp, block.post_attention_layernorm(h)))
        h = site_out(i, "output", h + mlp)
    if stop_layer is not None:
        return ForwardOutput(None, activations)
    return ForwardOutput(_lm_head(module, module.model.norm(h)), activations)


def make_cache(model: Any) -> list[Any]:
    """An empty KV cache for ``forward_cached`` (mlx-lm's: one ``KVCache`` per block)."""
    return make_prompt_cache(unwrap_model(model))


def forward_cached(model: Any, tokens: mx.array, cache: list[Any], *,
                   edit: Mapping[Site, Edit] | None = None) -> mx.array:
    """Logits (B, T, vocab) of ``tokens`` continuing the positions already in ``cache`` (from
    ``make_cache``; updated in place): incremental decoding for generation.

    ``edit`` as in ``forward``, applied to these T positions only (the caller builds edits for the
    absolute positions ``cache[0].offset .. + T``). Attention runs through the model's own mlx-lm
    modules (rotary offset and masks from the cache), so logits match ``forward``'s to float32
    rounding, not bit for bit. Lazy: the caller evaluates.
    """
    module = unwrap_model(model)
    n_layers = len(module.model.layers)
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a (batch, seq) array, got shape {tokens.shape}")
    if len(cache) != n_layers:
        raise ValueError(f"cache has {len(cache)} entries, the model has {n_layers} blocks")
    edits = dict(zip(_check_sites(list(edit or {}), n_layers, None, "edit"), (edit or {}).values(), strict=True))
    return _run(module, tokens, None, set(), edits, _Start(0, None), cache).logits


def _run_split(module: Any, tokens: mx.array, stop_layer: int | None, capture_sites: set[Site],
               edits: dict[Site, Any], start: _Start, parts: int) -> ForwardOutput:
    """``_run`` on ``parts`` row ranges, each on its own CPU stream, concatenated and evaluated."""
    bounds = [round(i * tokens.shape[0] / parts) for i in range(parts + 1)]
    outs = []
    for stream, a, b in zip(_cpu_streams(parts), bounds[:-1], bounds[1:], strict=True):
        with mx.stream(stream):
            part_edits = {site: fn.rows(a, b) for site, fn in edits.items()}
            part_start = _Start(start.layer, None if start.residual is None else start.residual[a:b])
            outs.append(_run(module, tokens[a:b], stop_layer, capture_sites, part_edits, part_start))
    logits = None if stop_layer is not None else mx.concatenate([o.logits for o in outs])
    activations = {s: mx.concatenate([o.activations[s] for o in outs]) for s in capture_sites}
    with blas_threads.single_threaded():  # two single-threaded GEMMs at once beat one 2-thread GEMM
        mx.eval(logits, activations)
    return ForwardOutput(logits, activations)


_STREAMS: list[Any] = []


def _cpu_streams(n: int) -> list[Any]:
    while len(_STREAMS) < n:
        _STREAMS.append(mx.new_stream(mx.cpu))
    return _STREAMS[:n]


def _parallel_parts(batch: int) -> int:
    """How many streams to split a batch over: one per core (at most one row each), CPU only.

    On CPU MLX runs each elementwise kernel (SwiGLU, softmax, RoPE, norms) on one core, and
    OpenBLAS's 2-thread GEMMs stall whenever a core is busy elsewhere; rows split over
    per-core streams with single-threaded BLAS use every core for all of it (bit-identical rows).
    """
    if not on_cpu() or not blas_threads.can_set_threads():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(batch, cores))


def _lm_head(module: Any, h: mx.array) -> mx.array:
    if getattr(module.args, "tie_word_embeddings", False) or not hasattr(module, "lm_head"):
        return module.model.embed_tokens.as_linear(h)
    return module.lm_head(h)


# --- Fast CPU kernels for the non-GEMM part of a block --------------------------------------------
# MLX's CPU exp/sigmoid are slow and its fused SDPA is unblocked on CPU, so SwiGLU and softmax
# dominated a block. A Cody-Waite range reduction + degree-6 polynomial exp (max relative error
# ~4e-7, i.e. float32 rounding) built from compiled elementwise ops is much faster
# (saepipe.lm.fastmath; numbers in docs/performance.md).


@mx.compile  # per input shape: `view` (in _exp) cannot be shapeless; retracing is cheap
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up = gate * up / (1 + exp(-gate)), one fused pass."""
    return gate * up / (1.0 + _exp(-gate))


@mx.compile  # per input shape: `view` (in _exp) cannot be shapeless; retracing is cheap
def _causal_softmax(scores: mx.array, keep: mx.array, scale: mx.array) -> mx.array:
    """softmax(scale * scores) over the last axis where ``keep``; masked entries are exactly 0."""
    s = mx.where(keep, scores * scale, -mx.inf)
    e = mx.where(keep, _exp(s - mx.max(s, axis=-1, keepdims=True)), 0.0)
    return e / mx.sum(e, axis=-1, keepdims=True)


def on_cpu() -> bool:
    """Whether MLX computes on the CPU, where the CPU formulations here apply (per-core streams, the
    fast exp, the unfused attention). On a GPU mlx-lm's own modules are the fast path (fused
    scaled-dot-product attention) and everything runs on the default GPU stream."""
    return mx.default_device() == mx.cpu


def _attention(attn: Any, x: mx.array) -> mx.array:
    """Causal self-attention of an mlx-lm Llama ``Attention`` (its own ``__call__`` otherwise, and on
    a GPU)."""
    if type(attn) is not llama.Attention or x.dtype != mx.float32 or not on_cpu():
        return attn(x, mask="causal")
    b, t, _ = x.shape
    h, kv = attn.n_heads, attn.n_kv_heads
    q = attn.rope(attn.q_proj(x).reshape(b, t, h, -1).transpose(0, 2, 1, 3))
    k = attn.rope(attn.k_proj(x).reshape(b, t, kv, -1).transpose(0, 2, 1, 3))
    v = attn.v_proj(x).reshape(b, t, kv, -1).transpose(0, 2, 1, 3)
    d = q.shape[-1]
    # grouped-query attention: the h // kv query heads of a KV head share one batched matmul
    q = q.reshape(b, kv, (h // kv) * t, d)
    scores = (q @ k.swapaxes(-1, -2)).reshape(b, kv, h // kv, t, t)
    keep = mx.arange(t)[:, None] >= mx.arange(t)[None]
    probs = _causal_softmax(scores, keep, mx.array(attn.scale, dtype=mx.float32))
    out = probs.reshape(b, kv, (h // kv) * t, t) @ v
    return attn.o_proj(out.reshape(b, h, t, d).transpose(0, 2, 1, 3).reshape(b, t, h * d))


def _mlp(mlp: Any, x: mx.array) -> mx.array:
    """SwiGLU MLP of an mlx-lm Llama ``MLP`` with the fast fused activation (on a CPU)."""
    if type(mlp) is not llama.MLP or x.dtype != mx.float32 or not on_cpu():
        return mlp(x)
    return mlp.down_proj(_swiglu(mlp.gate_proj(x), mlp.up_proj(x)))
