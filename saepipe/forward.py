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
text's own positions. The arithmetic is the same as mlx-lm's ``model(tokens)`` (tested), but the
elementwise parts of a block run as compiled fused kernels, which is most of the CPU time outside the
GEMMs for small models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import mlx.core as mx

import saepipe  # noqa: F401  (fast BLAS before mlx)
from saepipe.sites import Site, check_site

Edit = Callable[[mx.array], mx.array]


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
) -> ForwardOutput:
    """Run ``model`` on ``tokens`` (B, T) block by block, capturing and/or editing component outputs.

    ``stop_layer``: run blocks 0..stop_layer only (no final norm / LM head; logits None).
    ``capture``: sites whose (B, T, d_model) outputs are returned in ``activations``.
    ``edit``: per site, a function of the component output returning its replacement.
    Results are lazy MLX arrays; evaluate them with ``mx.eval``.
    """
    module = unwrap_model(model)
    layers = module.model.layers
    n_layers = len(layers)
    if stop_layer is not None:
        stop_layer = check_site(stop_layer, "output", n_layers).layer
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a (batch, seq) array, got shape {tokens.shape}")
    capture_sites = set(_check_sites(list(capture), n_layers, stop_layer, "capture"))
    edits = dict(zip(_check_sites(list(edit or {}), n_layers, stop_layer, "edit"),
                     (edit or {}).values(), strict=True))

    def site_out(layer: int, component: str, x: mx.array) -> mx.array:
        site = Site(layer, component)
        fn = edits.get(site)
        if fn is not None:
            x = fn(x)
        if site in capture_sites:
            activations[site] = x
        return x

    activations: dict[Site, mx.array] = {}
    h = module.model.embed_tokens(tokens)
    last = n_layers - 1 if stop_layer is None else stop_layer
    for i in range(last + 1):
        block = layers[i]
        attn = site_out(i, "attn", block.self_attn(block.input_layernorm(h), mask="causal"))
        h = h + attn
        mlp = site_out(i, "mlp", block.mlp(block.post_attention_layernorm(h)))
        h = site_out(i, "output", h + mlp)
    if stop_layer is not None:
        return ForwardOutput(None, activations)
    return ForwardOutput(_lm_head(module, module.model.norm(h)), activations)


def _lm_head(module: Any, h: mx.array) -> mx.array:
    if getattr(module.args, "tie_word_embeddings", False) or not hasattr(module, "lm_head"):
        return module.model.embed_tokens.as_linear(h)
    return module.lm_head(h)
