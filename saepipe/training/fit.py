"""Training a TopK SAE: ``fit_sae(activations, config) -> FitResult``.

Recipe (Gao et al. 2024; EleutherAI sparsify):

- inputs standardised with ``NormStats`` (given, or fit on the training rows) when
  ``config.normalize_input``; the SAE trains in normalized units and de-normalizes its output;
- decoder rows random unit vectors, encoder = decoder transpose, ``b_dec`` = geometric median of a
  sample of training rows, ``b_enc`` = 0;
- loss = FVU + aux_coef * AuxK + l1_coefficient * L1, where per batch
  FVU  = sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2,
  AuxK = min(n_dead / k_aux, 1) * sum ||e - e_hat||^2 / sum ||e - mean_batch(e)||^2, with
  e = x - x_hat (no gradient) and e_hat = W_dec-decode of the top-k_aux *dead* latents'
  (ReLU) pre-activations, without b_dec. Dividing by e's own variance makes AuxK ~1 at e_hat = 0
  whatever the residual's size; the min() scale is sparsify's (few dead latents: smaller loss);
  L1 = mean over rows of the sum of the kept latent values;
- a latent is dead when it has not fired (value > 0 in the top-k) on ``dead_tokens_threshold``
  consecutive training tokens (a per-latent counter, saturating at the threshold);
- Adam (bias-corrected), linear warmup then ``lr_decay``; the gradient component parallel to each
  decoder row is removed before clipping the global norm (``gradient_clip``, 0 = off) and the rows
  are renormalized after each step;
- each epoch visits the training rows in a seeded permutation, ``batch_size`` rows per step (the
  remainder that does not fill a batch is skipped that epoch); rows are read with
  ``source.take(sorted indices)`` one batch at a time (one batch prefetched), never all at once;
- ``validation_split`` of the rows (chosen by seed) is held out and scored at each epoch end;
- checkpoints (one safetensors file: weights, Adam state, dead counters; JSON position in its
  header) every ``checkpoint_every`` steps and at each epoch end; a run resumes from a matching
  checkpoint and reaches the same weights as an uninterrupted run; a NaN/Inf stops training with
  ``TrainingDivergedError`` and leaves the last good checkpoint.

Kernels (same math, see ``KERNELS``): on a CPU ``fit_sae`` runs ``saepipe.training.cpu_step.CpuStep`` (MLX
matmul + multi-threaded numba kernels), elsewhere ``saepipe.training.mlx_step.make_train_step``; both are
tested against the dense reference ``_make_step`` here (``kernels="reference"``), built on
``_encode_select`` and ``_decode``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import saepipe  # noqa: F401  (fast BLAS before mlx)
from saepipe.activations.sources import ActivationSource, as_source
from saepipe.activations.stats import NormStats
from saepipe.runtime.memory import reuse_freed_memory
from saepipe.sae.config import SAEConfig
from saepipe.sae.topk import TopKSAE, _Norm, init_params, to_dense, topk
from saepipe.training.mlx_step import constrained_adam, update_dead_counter
from saepipe.training.tracking import DVCLiveLogger, MultiLogger, TrainLogger, WandbLogger

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
_METRICS = ("loss", "fvu", "recon_mse", "aux_loss", "l1_loss", "l0", "grad_norm", "dead_fraction")
_GEOMED_ROWS = 16384
_READ_ROWS = 65536


class FitResult(NamedTuple):
    sae: TopKSAE
    """The trained SAE (metadata filled in: config, summary, stats digest, ...)."""
    history: list[dict[str, float]]
    """One entry per finished epoch: mean training metrics of the epoch and the validation metrics."""
    summary: dict[str, Any]
    """Final figures: steps, tokens, seconds, tok_per_s, last epoch's train/* and val/* metrics."""


class TrainingDivergedError(FloatingPointError):
    """A training metric became NaN or Inf."""


class _Split(NamedTuple):
    train: np.ndarray  # sorted row indices
    val: np.ndarray  # sorted row indices


# --------------------------------------------------------------------------------------------------
# Swap points: straightforward MLX formulations (saepipe.training.mlx_step provides faster ones).
# --------------------------------------------------------------------------------------------------
def _encode_select(
    xc: mx.array, W_enc: mx.array, b_enc: mx.array, k: int, dead: mx.array | None, k_aux: int
) -> tuple[mx.array, mx.array, mx.array | None, mx.array | None]:
    """Top-k code of centred inputs ``xc`` and, when ``dead`` (bool (d_hidden,)) is given, the
    top-``k_aux`` ReLU pre-activations among dead latents (live ones count as 0 and get no gradient).

    Returns (values, indices, aux_values, aux_indices); values are differentiable w.r.t. W_enc, b_enc.
    """
    pre = nn.relu(xc @ W_enc.T + b_enc)
    values, indices = topk(pre, k)
    if dead is None:
        return values, indices, None, None
    aux_values, aux_indices = topk(mx.where(dead, pre, 0.0), k_aux)
    return values, indices, aux_values, aux_indices


def _decode(values: mx.array, indices: mx.array, W_dec: mx.array) -> mx.array:
    """sum_j values[:, j] * W_dec[indices[:, j]]: (n, d_model), differentiable w.r.t. values and W_dec."""
    return to_dense(values, indices, W_dec.shape[0]) @ W_dec


# --------------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------------
def _loss_fn(params: dict, x: mx.array, dead: mx.array | None, aux_scale: mx.array, *,
             k: int, k_aux: int, aux_coef: float, l1_coef: float, tied: bool) -> tuple[mx.array, ...]:
    W_enc = params["W_dec"] if tied else params["W_enc"]
    values, indices, aux_values, aux_indices = _encode_select(
        x - params["b_dec"], W_enc, params["b_enc"], k, dead, k_aux)
    x_hat = _decode(values, indices, params["W_dec"]) + params["b_dec"]
    e = x - x_hat
    sse = (e * e).sum()
    total_var = mx.maximum(mx.square(x - x.mean(axis=0)).sum(), 1e-12)
    fvu = sse / total_var
    l1 = values.sum(axis=-1).mean()
    loss = fvu + l1_coef * l1 if l1_coef else fvu
    aux = mx.array(0.0)
    if dead is not None:
        e = mx.stop_gradient(e)
        e_hat = _decode(aux_values, aux_indices, params["W_dec"])
        e_var = mx.maximum(mx.square(e - e.mean(axis=0)).sum(), 1e-12)
        aux = aux_scale * mx.square(e_hat - e).sum() / e_var
        loss = loss + aux_coef * aux
    mse = sse / e.size
    l0 = (values > 0).sum(axis=-1).astype(mx.float32).mean()
    return loss, fvu, mse, aux, l1, l0, values, indices


def _make_step(config: SAEConfig, d_hidden: int, k_aux: int, with_aux: bool) -> Callable:
    """A compiled training step; ``with_aux`` adds the AuxK term (used while latents are dead)."""
    tied = config.tied_weights
    clip = float(config.gradient_clip)
    threshold = int(config.dead_tokens_threshold)

    def loss_only(params, x, dead, aux_scale):
        out = _loss_fn(params, x, dead if with_aux else None, aux_scale, k=config.k, k_aux=k_aux,
                       aux_coef=config.aux_coef, l1_coef=config.l1_coefficient, tied=tied)
        return out

    grad_fn = mx.value_and_grad(loss_only)

    def step(params, m, v, t, lr, x, mean, std, counter, aux_scale):
        x = (x - mean) / std
        dead = counter >= threshold
        (loss, fvu, mse, aux, l1, l0, values, indices), grads = grad_fn(params, x, dead, aux_scale)
        new_params, new_m, new_v, t, gnorm = constrained_adam(params, grads, m, v, t, lr, clip)
        counter, dead_fraction = update_dead_counter(counter, indices, values, threshold)
        metrics = mx.stack([loss, fvu, mse, aux, l1, l0, gnorm, dead_fraction])
        return new_params, new_m, new_v, t, counter, metrics

    return mx.compile(step)


def _make_eval(config: SAEConfig, d_hidden: int, kernels: str = "sparse") -> Callable:
    """Compiled validation chunk: (sse, sum x, sum ||x||^2, sum L0, sum L1, fired counts)."""
    tied = config.tied_weights
    if kernels in ("sparse", "cpu"):
        from saepipe.training import mlx_step as sparse_ops

        def encode_decode(xc, W_enc, b_enc, W_dec):
            values, indices = sparse_ops.topk(nn.relu(xc @ W_enc.T + b_enc), config.k)
            return values, indices, sparse_ops.decode_rows(values, indices, W_dec)
    else:
        def encode_decode(xc, W_enc, b_enc, W_dec):
            values, indices, _, _ = _encode_select(xc, W_enc, b_enc, config.k, None, 0)
            return values, indices, _decode(values, indices, W_dec)

    def evaluate(params, x, mean, std):
        x = (x - mean) / std
        W_enc = params["W_dec"] if tied else params["W_enc"]
        values, indices, x_hat = encode_decode(x - params["b_dec"], W_enc, params["b_enc"], params["W_dec"])
        e = x - (x_hat + params["b_dec"])
        fired = mx.zeros((d_hidden,), dtype=mx.int32).at[indices.reshape(-1)].add(
            (values > 0).reshape(-1).astype(mx.int32))
        sums = mx.stack([mx.square(e).sum(), mx.square(x).sum(),
                         (values > 0).sum().astype(mx.float32), values.sum()])
        return sums, x.sum(axis=0), fired

    return mx.compile(evaluate)


KERNELS = ("auto", "cpu", "sparse", "reference")
"""``auto``: ``cpu`` when MLX computes on the CPU, else ``sparse``.
``cpu``: ``saepipe.training.cpu_step.CpuStep`` (MLX encoder matmul, multi-threaded numba kernels for top-k,
sparse decode, gradients and Adam: the fast path on a CPU, where MLX runs those on one core);
``sparse``: ``saepipe.training.mlx_step.make_train_step`` (sparse top-k, decode and gradients in MLX; AuxK
over the dead columns only, one compiled variant per power-of-two bucket of dead latents);
``reference``: ``_make_step`` (dense MLX ops, the definition the other kernels are tested against)."""


def resolve_kernels(kernels: str) -> str:
    """The kernels ``kernels`` stands for (``auto`` resolved for this machine); checks the name."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if kernels == "auto":
        from saepipe.training import cpu_step

        return "cpu" if cpu_step.available() else "sparse"
    return kernels


class _Steps:
    """Compiled steps by variant: no AuxK, or AuxK (per dead-count bucket for the sparse kernels)."""

    def __init__(self, config: SAEConfig, d_hidden: int, k_aux: int, kernels: str) -> None:
        self.config, self.d_hidden, self.k_aux, self.kernels = config, d_hidden, k_aux, kernels
        self.cache: dict[int, Callable] = {}

    def __call__(self, n_dead: int) -> Callable:
        aux = self.config.aux_coef > 0 and n_dead > 0
        if self.kernels == "reference":
            key = int(aux)
            if key not in self.cache:
                self.cache[key] = _make_step(self.config, self.d_hidden, self.k_aux, aux)
            return self.cache[key]
        from saepipe.training import mlx_step as sparse_ops

        key = sparse_ops.aux_capacity(n_dead, self.d_hidden) if aux else 0
        if key not in self.cache:
            self.cache[key] = sparse_ops.make_train_step(self.config, self.d_hidden, self.k_aux, key)
        return self.cache[key]


class _MlxRunner:
    """The compiled MLX steps behind the interface of ``saepipe.training.cpu_step.CpuStep``."""

    def __init__(self, config: SAEConfig, d_hidden: int, k_aux: int, kernels: str, state: _State) -> None:
        self.steps = _Steps(config, d_hidden, k_aux, kernels)
        self.k_aux, self._state = k_aux, state

    def step(self, lr: float, x: mx.array, mean: mx.array, std: mx.array, n_dead: int) -> np.ndarray:
        st = self._state
        aux_scale = mx.array(min(n_dead / self.k_aux, 1.0))
        params, m, v, t, counter, metrics = self.steps(n_dead)(
            st.params, st.m, st.v, st.t, mx.array(lr), x, mean, std, st.counter, aux_scale)
        self._state = _State(params, m, v, t, counter)
        return np.array(metrics, dtype=np.float64)  # syncs: one step at a time

    def state(self) -> _State:
        return self._state


def _make_runner(config: SAEConfig, d_hidden: int, k_aux: int, kernels: str, state: _State):
    if kernels == "cpu":
        from saepipe.training.cpu_step import CpuStep

        return CpuStep(config, d_hidden, k_aux, state)
    return _MlxRunner(config, d_hidden, k_aux, kernels, state)


# --------------------------------------------------------------------------------------------------
# Schedule, split, data
# --------------------------------------------------------------------------------------------------
def learning_rate_at(step: int, total_steps: int, config: SAEConfig) -> float:
    """Learning rate of optimisation step ``step`` (0-based): linear warmup, then ``lr_decay``."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_decay == "constant":
        return peak
    low = peak * config.min_lr_ratio
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    if config.lr_decay == "linear":
        return peak + (low - peak) * progress
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))


def split_rows(n_rows: int, validation_split: float, seed: int) -> _Split:
    """Seeded train/validation split of row indices (both sorted); at least one training row."""
    n_val = int(n_rows * validation_split)
    if validation_split > 0 and n_val == 0 and n_rows >= 2:
        n_val = 1
    n_val = min(n_val, n_rows - 1)
    perm = np.random.default_rng([seed, 0]).permutation(n_rows)
    return _Split(np.sort(perm[n_val:]), np.sort(perm[:n_val]))


def epoch_order(train_rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The training rows in the order epoch ``epoch`` visits them (seeded, independent per epoch)."""
    return train_rows[np.random.default_rng([seed, 1, epoch]).permutation(len(train_rows))]


def _read(source: ActivationSource, rows: np.ndarray):
    """Rows of ``rows`` (any order) in chunks of sorted indices, each (index chunk, float32 array)."""
    rows = np.sort(rows)
    for start in range(0, len(rows), _READ_ROWS):
        chunk = rows[start : start + _READ_ROWS]
        yield chunk, source.take(chunk)


def fit_stats(source: ActivationSource, rows: np.ndarray) -> NormStats:
    """Normalization stats of the given rows only (``saepipe.activations.normalize``'s float64 Chan merge, streamed)."""
    from saepipe.activations.normalize import reduce_moments, to_stats

    return to_stats(reduce_moments(x for _, x in _read(source, rows)))


def geometric_median(x: np.ndarray, iters: int = 50, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm on the rows of ``x`` (float64)."""
    x = x.astype(np.float64)
    guess = x.mean(axis=0)
    for _ in range(iters):
        w = 1.0 / np.maximum(np.linalg.norm(x - guess, axis=1), 1e-8)
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        if np.linalg.norm(new - guess) <= tol * max(1.0, np.linalg.norm(guess)):
            return new
        guess = new
    return guess


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
class _State(NamedTuple):
    params: dict
    m: dict
    v: dict
    t: mx.array
    counter: mx.array


def _save_checkpoint(directory: Path, state: _State, info: dict[str, Any]) -> Path:
    """One safetensors file (tensors + JSON position in the header), replaced atomically."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"params.{n}": np.asarray(a) for n, a in state.params.items()}
    tensors |= {f"adam_m.{n}": np.asarray(a) for n, a in state.m.items()}
    tensors |= {f"adam_v.{n}": np.asarray(a) for n, a in state.v.items()}
    tensors["adam_t"] = np.asarray(state.t).reshape(1)
    tensors["dead_counter"] = np.asarray(state.counter)
    path = directory / CHECKPOINT_NAME
    tmp = directory / (CHECKPOINT_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"saepipe_checkpoint": json.dumps(info)})
    tmp.replace(path)
    return path


def _load_checkpoint(directory: Path) -> tuple[_State, dict[str, Any]] | None:
    from safetensors import safe_open

    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            info = json.loads((f.metadata() or {})["saepipe_checkpoint"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:
        log.warning("ignoring unreadable checkpoint %s (%s)", path, err)
        return None

    def group(prefix: str) -> dict:
        return {k[len(prefix):]: mx.array(a) for k, a in tensors.items() if k.startswith(prefix)}

    state = _State(group("params."), group("adam_m."), group("adam_v."),
                   mx.array(tensors["adam_t"].reshape(())), mx.array(tensors["dead_counter"]))
    return state, info


def _all_finite(params: dict) -> bool:
    return all(bool(mx.all(mx.isfinite(p)).item()) for p in params.values())


# --------------------------------------------------------------------------------------------------
# fit_sae
# --------------------------------------------------------------------------------------------------
def fit_sae(
    activations: object,
    config: SAEConfig,
    *,
    stats: NormStats | None = None,
    metadata: dict[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    live_dir: str | Path | None = None,
    logger: TrainLogger | None = None,
    log_every: int = 10,
    max_steps: int | None = None,
    progress: bool = True,
    kernels: str = "auto",
) -> FitResult:
    """Train a TopK SAE on ``activations`` ((n, d_model) array, shard folder or ActivationSource).

    ``stats``: normalization stats to use when ``config.normalize_input`` (fit on the training rows
    when None). ``metadata``: recorded in the SAE (layer, component, model_name, model_hash, ...).
    ``checkpoint_dir``: where checkpoints go; a checkpoint there from the same config and data is
    resumed. ``live_dir``: a dvclive folder for metrics. ``logger``: extra ``TrainLogger``.
    ``log_every``: steps between logged step metrics. ``max_steps``: stop after this many steps in
    total (checkpointing when ``checkpoint_dir`` is set; the schedule still spans the full run).
    ``kernels``: "auto" (default: the fastest for this device), "cpu", "sparse" or "reference"
    (dense MLX ops), see ``KERNELS``.
    """
    kernels = resolve_kernels(kernels)
    source = as_source(activations)
    d_model, n_rows = source.d_model, source.n_rows
    d_hidden = d_model * config.expansion_factor
    if config.k > d_hidden:
        raise ValueError(f"k={config.k} exceeds d_hidden={d_hidden} (d_model {d_model} x {config.expansion_factor})")
    k_aux = min(config.k_aux if config.k_aux is not None else d_model // 2, d_hidden)
    if k_aux < 1:
        raise ValueError(f"k_aux must be >= 1, got {k_aux}")
    split = split_rows(n_rows, config.validation_split, config.seed)
    n_train = len(split.train)
    batch_size = min(config.batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    total_steps = steps_per_epoch * config.num_epochs

    if config.normalize_input and stats is None:
        stats = fit_stats(source, split.train)
    if not config.normalize_input:
        stats = None
    if stats is not None and np.asarray(stats.mean).shape != (d_model,):
        raise ValueError(f"stats are for d_model {np.asarray(stats.mean).shape[0]}, activations have {d_model}")
    norm = _Norm(stats, config.normalization) if stats is not None else None
    mean = norm.mean if norm else mx.zeros((d_model,))
    std = norm.std if norm else mx.ones((d_model,))

    run_info = {
        "config": config.to_dict(), "d_model": d_model, "n_rows": n_rows, "n_train": n_train,
        "n_val": len(split.val), "stats_digest": stats.digest() if stats is not None else None,
        "activations_digest": _source_metadata(source).get("activations_digest"),
    }
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed = _resume(ckpt_dir, run_info)
    if resumed is not None:
        state, pos = resumed
        log.info("resuming from %s at step %d", ckpt_dir, pos["step"])
    else:
        state = _initial_state(source, split.train, config, d_model, d_hidden, mean, std)
        pos = {"step": 0, "epoch": 0, "batch": 0, "history": [], "epoch_sums": [0.0] * len(_METRICS),
               "epoch_steps": 0, "seconds": 0.0, "first_loss": None, "last_loss": None}

    loggers: list[TrainLogger] = [logger] if logger is not None else []
    if live_dir is not None:
        loggers.append(DVCLiveLogger(live_dir, log_every=log_every, resume=resumed is not None))
    if config.use_wandb:
        loggers.append(WandbLogger(config.wandb_project, config.wandb_name, config.wandb_tags, log_every))
    sink = MultiLogger(loggers)
    meta = {**_source_metadata(source), **(metadata or {})}
    sink.log_config({**config.to_dict(), "d_model": d_model, "d_hidden": d_hidden,
                     "layer": meta.get("layer"), "component": meta.get("component"),
                     "n_rows": n_rows, "n_train": n_train, "n_val": len(split.val),
                     "steps_per_epoch": steps_per_epoch, "total_steps": total_steps})
    try:
        with reuse_freed_memory():  # the step's big buffers are reused, not page-faulted in anew
            state, pos, completed = _train_loop(
                source, split, config, state, pos, mean, std, d_hidden, k_aux, batch_size,
                steps_per_epoch, total_steps, run_info, ckpt_dir, sink, max_steps, progress, kernels)
    finally:
        sink.close()

    summary = _summary(pos, state, config, batch_size, completed, n_train, len(split.val))
    sae = TopKSAE(d_model, config.expansion_factor, config.k, tied_weights=config.tied_weights,
                  stats=stats, normalization=config.normalization)
    sae.update(dict(state.params))
    sae.update_metadata(**meta, config=config.to_dict(), summary=summary, n_train_rows=n_train,
                        n_val_rows=len(split.val))
    return FitResult(sae, list(pos["history"]), summary)


def _source_metadata(source: ActivationSource) -> dict[str, Any]:
    """Site and model identity from a shard folder's manifest (empty for arrays)."""
    manifest = getattr(source, "manifest", None)
    if not isinstance(manifest, dict):
        return {}
    keys = {"model_id": "model_name", "model_hash": "model_hash", "layer": "layer", "component": "component",
            "site": "site", "digest": "activations_digest", "n_tokens": "activations_rows"}
    return {ours: manifest[theirs] for theirs, ours in keys.items() if manifest.get(theirs) is not None}


def _resume(ckpt_dir: Path | None, run_info: dict) -> tuple[_State, dict] | None:
    if ckpt_dir is None:
        return None
    loaded = _load_checkpoint(ckpt_dir)
    if loaded is None:
        return None
    state, info = loaded
    if info.get("run") != json.loads(json.dumps(run_info)):
        log.warning("checkpoint in %s is from another config or data; starting afresh", ckpt_dir)
        return None
    return state, info["position"]


def _initial_state(source: ActivationSource, train_rows: np.ndarray, config: SAEConfig, d_model: int,
                   d_hidden: int, mean: mx.array, std: mx.array) -> _State:
    params = init_params(d_model, d_hidden, config.tied_weights, config.seed)
    rng = np.random.default_rng([config.seed, 2])
    sample = np.sort(rng.choice(train_rows, size=min(len(train_rows), _GEOMED_ROWS), replace=False))
    x = (source.take(sample) - np.asarray(mean)) / np.asarray(std)
    params["b_dec"] = mx.array(geometric_median(x).astype(np.float32))
    zeros = {n: mx.zeros_like(p) for n, p in params.items()}
    return _State(params, zeros, dict(zeros), mx.array(0.0), mx.zeros((d_hidden,), dtype=mx.int32))


def _train_loop(source, split, config, state, pos, mean, std, d_hidden, k_aux, batch_size,
                steps_per_epoch, total_steps, run_info, ckpt_dir, sink, max_steps, progress, kernels):
    """Epochs of steps from ``pos``; returns (state, pos, completed)."""
    from tqdm.auto import tqdm

    runner = _make_runner(config, d_hidden, k_aux, kernels, state)
    evaluate = _make_eval(config, d_hidden, kernels)
    threshold = config.dead_tokens_threshold
    n_dead = int((np.asarray(state.counter) >= threshold).sum())
    bar = tqdm(total=total_steps * batch_size, initial=pos["step"] * batch_size, unit="tok",
               unit_scale=True, disable=not progress, desc="train", dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=1)

    def save(position: dict) -> None:
        if ckpt_dir is None:
            return
        current = runner.state()
        if not _all_finite(current.params):
            raise TrainingDivergedError(f"non-finite weights after step {position['step']}; "
                                        f"last good checkpoint kept in {ckpt_dir}")
        _save_checkpoint(ckpt_dir, current, {"run": run_info, "position": position})

    try:
        for epoch in range(pos["epoch"], config.num_epochs):
            order = epoch_order(split.train, config.seed, epoch)
            batches = [np.sort(order[b * batch_size : (b + 1) * batch_size]) for b in range(steps_per_epoch)]
            start = pos["batch"]
            pending = pool.submit(source.take, batches[start]) if start < steps_per_epoch else None
            for b in range(start, steps_per_epoch):
                if max_steps is not None and pos["step"] >= max_steps:
                    save(pos)
                    return runner.state(), pos, False
                t0 = time.perf_counter()
                x = mx.array(pending.result())
                if b + 1 < steps_per_epoch:
                    pending = pool.submit(source.take, batches[b + 1])
                lr = learning_rate_at(pos["step"], total_steps, config)
                values = runner.step(lr, x, mean, std, n_dead)
                step = pos["step"] + 1
                _check_finite(values, step, ckpt_dir)
                n_dead = round(float(values[_METRICS.index("dead_fraction")]) * d_hidden)
                record = dict(zip(_METRICS, values.tolist(), strict=True))
                record["learning_rate"] = lr
                pos = {**pos, "step": step, "batch": b + 1, "epoch_steps": pos["epoch_steps"] + 1,
                       "epoch_sums": [s + val for s, val in zip(pos["epoch_sums"], values.tolist(), strict=True)],
                       "seconds": pos["seconds"] + time.perf_counter() - t0, "last_loss": record["loss"],
                       "first_loss": record["loss"] if pos["first_loss"] is None else pos["first_loss"]}
                sink.log_step(step, record)
                bar.update(batch_size)
                bar.set_postfix(loss=f"{record['loss']:.4f}", L0=f"{record['l0']:.1f}",
                                dead=f"{record['dead_fraction']:.3f}", refresh=False)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and b + 1 < steps_per_epoch:
                    save(pos)
            val = _validate(source, split.val, evaluate, runner.state().params, mean, std, d_hidden, config)
            train_means = {f"train/{n}": s / max(1, pos["epoch_steps"])
                           for n, s in zip(_METRICS, pos["epoch_sums"], strict=True)}
            entry = {"epoch": epoch, "step": pos["step"], **train_means, **val}
            sink.log_epoch(epoch, pos["step"], val)
            pos = {**pos, "epoch": epoch + 1, "batch": 0, "history": [*pos["history"], entry],
                   "epoch_sums": [0.0] * len(_METRICS), "epoch_steps": 0}
            save(pos)
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return runner.state(), pos, True


def _check_finite(values: np.ndarray, step: int, ckpt_dir: Path | None) -> None:
    bad = [name for name, val in zip(_METRICS, values, strict=True) if not math.isfinite(val)]
    if bad:
        kept = f"; last good checkpoint kept in {ckpt_dir}" if ckpt_dir is not None else ""
        raise TrainingDivergedError(
            f"training diverged at step {step}: {', '.join(bad)} is {values[_METRICS.index(bad[0])]}"
            f" (try a lower learning_rate or gradient_clip){kept}")


def _validate(source, rows, evaluate, params, mean, std, d_hidden, config) -> dict[str, float]:
    """val/loss (= FVU + L1 term), val/mse, val/fvu, val/l0, val/dead_fraction (never fired on val)."""
    if len(rows) == 0:
        return {}
    sse = sq = l0 = l1 = 0.0
    total = np.zeros(source.d_model)
    fired = np.zeros(d_hidden, dtype=np.int64)
    chunk = max(1, min(config.batch_size, 8192))
    for start in range(0, len(rows), chunk):
        sums, xsum, f = evaluate(params, mx.array(source.take(rows[start : start + chunk])), mean, std)
        s = np.array(sums, dtype=np.float64)
        sse, sq, l0, l1 = sse + s[0], sq + s[1], l0 + s[2], l1 + s[3]
        total += np.array(xsum, dtype=np.float64)
        fired += np.array(f)
    n = len(rows)
    total_var = max(sq - float(total @ total) / n, 1e-12)
    fvu = float(sse / total_var)
    return {"val/loss": fvu + config.l1_coefficient * float(l1) / n, "val/mse": float(sse) / (n * source.d_model),
            "val/fvu": fvu, "val/l0": float(l0) / n, "val/dead_fraction": float((fired == 0).mean())}


def _summary(pos: dict, state: _State, config: SAEConfig, batch_size: int, completed: bool,
             n_train: int, n_val: int) -> dict[str, Any]:
    tokens = pos["step"] * batch_size
    summary: dict[str, Any] = {
        "completed": completed, "steps": pos["step"], "epochs": pos["epoch"], "tokens": tokens,
        "train_seconds": round(pos["seconds"], 3),
        "tok_per_s": tokens / pos["seconds"] if pos["seconds"] > 0 else None,
        "n_train": n_train, "n_val": n_val,
        "initial_loss": pos["first_loss"], "final_loss": pos["last_loss"],
        "dead_fraction": float((np.asarray(state.counter) >= config.dead_tokens_threshold).mean()),
    }
    if pos["history"]:
        summary.update({k: v for k, v in pos["history"][-1].items() if k not in ("epoch", "step")})
    return summary


__all__ = ["FitResult", "TrainingDivergedError", "epoch_order", "fit_sae", "fit_stats",
           "geometric_median", "learning_rate_at", "split_rows"]
