"""``trace``: run texts through a model once, read any component output by its exact name, and edit
component outputs (steering) from inside the ``with`` block.

    with trace(loaded, ["Hello world", "Another text"]) as t:
        t.add_edit(Site(6, "mlp"), Add(vector))      # interventions register here ...
        logits = t.output.save()                     # ... and so do the values to keep
    t.activations["model.model.layers.10.mlp"]       # (batch, seq, d_model) mx.array
    logits.value                                     # (batch, seq, vocab), filled when the block exits

The forward pass is deferred: inside a ``with`` block it runs when the block exits, so every edit
registered in the block applies to it (nnsight / mlxterp style); ``activations``, ``logits`` and
saved values are there after the block, and reading them before is an error that says so. Used
without ``with``, a trace runs the first time a result is read. Each trace runs once; edits added
after it ran are an error.

While a ``with`` block is open the trace is its model's current trace (``current_trace``), which is
how ``model.output`` and ``sae.steer(model=...)`` of the Python API find it.

Names follow ``saepipe.lm.sites`` (``model.model.layers.{i}.mlp`` / ``.self_attn`` / the bare block
for its output, also with the ``model.layers`` prefix), matched exactly. Texts are tokenized as the
model's tokenizer says (a BOS is added only when it adds one: the default SmolLM2 adds none, the tiny
test models do) and right padded; ``lengths`` tells how many positions of each row are real, and
``text_positions`` which of them hold text rather than BOS or other special tokens (the positions
extraction stores and evaluation scores). Captured activations are the outputs after any edit at
that site.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from saepipe.lm.forward import Edit, chain, forward, unwrap_model
from saepipe.lm.sites import COMPONENTS, Site, check_site, parse_site_name
from saepipe.lm.tokens import excluded_token_ids, tokenize_padded


class TracePendingError(RuntimeError):
    """A trace's results were read before its ``with`` block exited (the forward has not run yet)."""


class Activations(Mapping[str, mx.array]):
    """Captured outputs by exact site name; an unknown or uncaptured name is a KeyError listing valid ones."""

    def __init__(self, by_site: dict[Site, mx.array], num_layers: int) -> None:
        self._by_site = by_site
        self._num_layers = num_layers

    def __getitem__(self, name: str) -> mx.array:
        site = parse_site_name(name, self._num_layers)  # KeyError naming the valid forms
        if site not in self._by_site:
            raise KeyError(f"{name!r} was not captured; captured: {', '.join(self)}")
        return self._by_site[site]

    def __iter__(self) -> Iterator[str]:
        return (site.name for site in self._by_site)

    def __len__(self) -> int:
        return len(self._by_site)


class Saved:
    """A value a trace fills when it runs (``trace.output.save()``, mlxterp's ``model.output.save()``).

    ``.value`` is the array once the ``with`` block has exited; before, reading it (or anything
    forwarded to it: ``.shape``, indexing, ``np.array(saved)``) raises ``TracePendingError``.
    Attributes and indexing are forwarded to the value, and ``mx.array(saved)`` converts it.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._value: mx.array | None = None

    @property
    def ready(self) -> bool:
        """True once the trace has run and the value is filled."""
        return self._value is not None

    @property
    def value(self) -> mx.array:
        if self._value is None:
            raise TracePendingError(
                f"{self._what} is not computed yet: the trace runs when its `with` block exits, so read the "
                "saved value after the block (e.g. `output.value`)")
        return self._value

    def fill(self, value: mx.array) -> None:
        self._value = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.value, name)

    def __getitem__(self, index: Any) -> mx.array:
        return self.value[index]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.value)
        return out if dtype is None else out.astype(dtype)

    def __mlx_array__(self) -> mx.array:
        return self.value

    def __repr__(self) -> str:
        if self._value is None:
            return f"Saved({self._what}: pending until the trace's `with` block exits)"
        return f"Saved({self._what}: shape {tuple(self._value.shape)}, {self._value.dtype})"


class TraceOutput:
    """``trace.output`` (mlxterp's ``model.output``) while a trace is pending: the logits it will
    compute; ``.save()`` keeps them in a ``Saved`` filled when the trace runs."""

    def __init__(self, owner: Trace) -> None:
        self._owner = owner

    def save(self) -> Saved:
        return self._owner.save_output()

    def __repr__(self) -> str:
        return "TraceOutput(the logits; call .save() inside the `with` block)"


_OPEN = threading.local()  # per thread: the stack of open traces (innermost last)


def _open_stack() -> list[Trace]:
    if not hasattr(_OPEN, "stack"):
        _OPEN.stack = []
    return _OPEN.stack


def current_trace(model: Any) -> Trace | None:
    """The innermost trace of ``model`` (a LoadedModel or its module) whose ``with`` block is open
    in this thread, or None."""
    module = unwrap_model(model)
    for t in reversed(_open_stack()):
        if t.module is module:
            return t
    return None


class Trace:
    """One deferred forward pass over tokenized texts: edits to apply, then token ids, lengths,
    logits (when computed) and activations (see the module docstring)."""

    def __init__(self, loaded: Any, tokens: np.ndarray, lengths: np.ndarray, sites: list[Site],
                 stop_layer: int | None, text_positions: np.ndarray | None = None) -> None:
        self.module = unwrap_model(loaded)
        self.tokens = tokens
        """(batch, seq) int32 token ids, right padded."""
        self.lengths = lengths
        """(batch,) number of real (non-pad) positions of each row."""
        if text_positions is None:
            text_positions = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        self.text_positions = text_positions
        """(batch, seq) bool: real positions that hold text, not BOS/special tokens (nor padding)."""
        self.num_layers = len(self.module.model.layers)
        self._sites = sites
        self._stop_layer = stop_layer
        self._edits: dict[Site, list[Edit]] = {}
        self._saved: list[Saved] = []
        self._state = "pending"  # -> "open" (inside `with`) -> "done"
        self._logits: mx.array | None = None
        self._activations: Activations | None = None

    # --- interventions and saved values --------------------------------------------------------
    def add_edit(self, site: Site, edit: Edit) -> None:
        """Apply ``edit`` to the output of ``site`` when the trace runs (after earlier edits there)."""
        self._check_not_run("add an edit")
        site = check_site(site[0], site[1], self.num_layers)
        self._edits.setdefault(site, []).append(edit)

    @property
    def edits(self) -> dict[Site, list[Edit]]:
        """The registered edits by site, in order (a copy)."""
        return {site: list(fns) for site, fns in self._edits.items()}

    @property
    def output(self) -> TraceOutput:
        """The logits to come (``.save()`` them inside the block); after the run, ``logits`` holds them."""
        return TraceOutput(self)

    def save_output(self) -> Saved:
        """A ``Saved`` that receives the (batch, seq, vocab) logits when the trace runs."""
        self._check_not_run("save its output")
        saved = Saved("the trace's output (logits)")
        self._saved.append(saved)
        return saved

    # --- results ---------------------------------------------------------------------------------
    @property
    def ran(self) -> bool:
        return self._state == "done"

    @property
    def logits(self) -> mx.array | None:
        """(batch, seq, vocab) logits, or None when only early layers were captured and nothing
        needed the output."""
        self._ensure_ran("logits")
        return self._logits

    @property
    def activations(self) -> Activations:
        """Component outputs by exact name, each (batch, seq, d_model), after any edit at that site."""
        self._ensure_ran("activations")
        assert self._activations is not None
        return self._activations

    # --- context manager -------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self._state != "pending":
            raise RuntimeError("a trace can be entered once, before it has run")
        self._state = "open"
        _open_stack().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _open_stack()
        if self in stack:
            stack.remove(self)
        self._state = "pending"
        if exc[0] is None:
            self.run()
            mx.eval([*self.activations.values(), *([] if self._logits is None else [self._logits])])

    def run(self) -> Trace:
        """Run the forward pass with the registered edits (once); fills results and saved values."""
        if self._state == "done":
            return self
        if self._state == "open":
            raise TracePendingError("the trace runs when its `with` block exits")
        edit_sites = list(self._edits)
        stop = max(s.layer for s in [*self._sites, *edit_sites]) if self._sites or edit_sites else None
        full = self._stop_layer is None or bool(self._saved) or stop == self.num_layers - 1
        edits = {site: chain(fns) for site, fns in self._edits.items()}
        out = forward(self.module, mx.array(self.tokens), capture=self._sites, edit=edits or None,
                      stop_layer=None if full else stop)
        self._logits = out.logits
        self._activations = Activations(out.activations, self.num_layers)
        for saved in self._saved:
            saved.fill(out.logits)
        self._state = "done"
        return self

    def _ensure_ran(self, what: str) -> None:
        if self._state == "open":
            raise TracePendingError(f"trace.{what} is not available inside the `with` block: the trace runs "
                                    "(with every edit registered in the block) when the block exits")
        self.run()

    def _check_not_run(self, what: str) -> None:
        if self._state == "done":
            raise RuntimeError(f"cannot {what}: this trace has already run (open a new `with trace(...)`)")


def trace(loaded: Any, texts: str | list[str], *, capture: Iterable[str] | None = None) -> Trace:
    """A deferred forward of ``texts`` through ``loaded`` (a LoadedModel) capturing component outputs.

    ``capture``: names to capture (default: every site of every layer). When all captured sites
    (and edits) are before the last block and no output is saved, the pass stops there and
    ``logits`` is None. Tokenization happens now; the forward at the ``with`` block's exit or at
    the first read of a result.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("trace needs at least one text")
    module = unwrap_model(loaded)
    n_layers = len(module.model.layers)
    if capture is None:
        sites = [Site(i, c) for i in range(n_layers) for c in COMPONENTS]
    else:
        sites = list(dict.fromkeys(parse_site_name(name, n_layers) for name in capture))
        if not sites:
            raise ValueError("capture names no site")
    tokens, lengths = tokenize_padded(loaded.tokenizer, texts)
    stop = None if capture is None else max(s.layer for s in sites)
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    text = real & ~np.isin(tokens, excluded_token_ids(loaded.tokenizer, skip_special_tokens=True))
    return Trace(loaded, tokens, lengths, sites, stop, text)


__all__ = ["Activations", "Saved", "Trace", "TraceOutput", "TracePendingError", "current_trace", "trace"]
