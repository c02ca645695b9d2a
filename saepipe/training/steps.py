"""Which training step runs: the ``kernels`` choice of ``fit_sae`` and the runner behind each.

Every step computes the same loss, gradients and update (``saepipe.training.state``); they differ
in how, for the device they are fast on:

- ``cpu``: ``saepipe.training.cpu_step.CpuStep`` (MLX encoder matmul, multi-threaded numba kernels
  for top-k, sparse decode, gradients and Adam: the fast path on a CPU, where MLX runs those on
  one core);
- ``sparse``: ``saepipe.training.mlx_step.make_train_step`` (sparse top-k, decode and gradients in
  MLX; AuxK over the dead columns only, one compiled variant per power-of-two bucket of dead
  latents): the fast path on a GPU;
- ``reference``: ``saepipe.training.reference.make_reference_step`` (dense MLX ops and autograd,
  the definition the other steps are tested against);
- ``auto``: ``cpu`` when MLX computes on the CPU, else ``sparse``.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from saepipe.parallel.ranks import Ranks
from saepipe.sae.config import SAEConfig
from saepipe.training import cpu_step, mlx_step
from saepipe.training.reference import make_reference_step
from saepipe.training.state import AuxK, StepRunner, TrainState

KERNELS = ("auto", "cpu", "sparse", "reference")
"""The ``kernels`` names ``fit_sae`` accepts (see the module docstring)."""


def resolve_kernels(kernels: str) -> str:
    """The kernels ``kernels`` stands for (``auto`` resolved for this machine); checks the name."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if kernels == "auto":
        return "cpu" if cpu_step.available() else "sparse"
    return kernels


class CompiledStepRunner:
    """A functional compiled MLX step (``reference`` or ``sparse``) behind the ``StepRunner`` interface.

    Steps are compiled per variant: without AuxK, and with it (per bucket of dead latents for the
    sparse step, whose AuxK touches a static number of columns).
    """

    def __init__(self, config: SAEConfig, d_hidden: int, auxk: AuxK, kernels: str, state: TrainState,
                 ranks: Ranks | None = None) -> None:
        self.config, self.d_hidden, self.auxk, self.kernels = config, d_hidden, auxk, kernels
        self.ranks = ranks or Ranks()
        self._compiled: dict[int, Callable] = {}
        self._state = state

    def _step_for(self, n_dead: int) -> Callable:
        aux = self.auxk.active(n_dead)
        if self.kernels == "reference":
            key = int(aux)
            if key not in self._compiled:
                self._compiled[key] = make_reference_step(self.config, self.d_hidden, self.auxk.k_aux, aux,
                                                          self.ranks)
        else:
            key = mlx_step.aux_capacity(n_dead, self.d_hidden) if aux else 0
            if key not in self._compiled:
                self._compiled[key] = mlx_step.make_train_step(self.config, self.d_hidden, self.auxk.k_aux, key,
                                                               ranks=self.ranks)
        return self._compiled[key]

    def step(self, lr: float, x: mx.array, mean: mx.array, std: mx.array, n_dead: int) -> np.ndarray:
        st = self._state
        aux_scale = mx.array(self.auxk.scale(n_dead))
        params, m, v, t, counter, metrics = self._step_for(n_dead)(
            st.params, st.m, st.v, st.t, mx.array(lr), x, mean, std, st.counter, aux_scale)
        self._state = TrainState(params, m, v, t, counter)
        return np.array(metrics, dtype=np.float64)  # syncs: one step at a time

    def state(self) -> TrainState:
        return self._state

    def load(self, state: TrainState) -> None:
        self._state = state  # the compiled steps never write their inputs: no copy needed


def make_runner(config: SAEConfig, d_hidden: int, auxk: AuxK, kernels: str, state: TrainState,
                ranks: Ranks | None = None) -> StepRunner:
    """The step of ``kernels`` (already resolved) starting from ``state``; with ``ranks`` (several)
    each step takes this rank's part of the global batch and applies the global batch's update."""
    if kernels == "cpu":
        return cpu_step.CpuStep(config, d_hidden, auxk.k_aux, state, ranks)
    return CompiledStepRunner(config, d_hidden, auxk, kernels, state, ranks)


__all__ = ["KERNELS", "CompiledStepRunner", "make_runner", "resolve_kernels"]
