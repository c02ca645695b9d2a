"""Training a TopK SAE: ``fit_sae(activations, config) -> FitResult``.

Recipe (Gao et al. 2024; EleutherAI sparsify):

- inputs standardised with ``NormStats`` (given, or fit on the training rows) when
  ``config.normalize_input``; the SAE trains in normalized units and de-normalizes its output;
- decoder rows random unit vectors, ``b_dec`` = geometric median of a sample of training rows,
  encoder = a x decoder transpose with a = ``encoder_init_scale`` or, by default, 0.85 x the
  least-squares scale of the sample's first top-k reconstruction (``state.fitted_encoder_scale``),
  ``b_enc`` = 0;
- loss = FVU + aux_coef * AuxK + l1_coefficient * L1, where per batch
  FVU  = sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2,
  AuxK = min(n_dead / k_aux, 1) * sum ||e - e_hat||^2 / sum ||e - mean_batch(e)||^2, with
  e = x - x_hat (no gradient) and e_hat = W_dec-decode of the top-k_aux *dead* latents'
  (ReLU) pre-activations, without b_dec. Dividing by e's own variance makes AuxK ~1 at e_hat = 0
  whatever the residual's size; the min() scale is sparsify's (few dead latents: smaller loss);
  L1 = mean over rows of the sum of the kept latent values;
- a latent is dead when it has not fired (value > 0 in the top-k) on ``dead_tokens_threshold``
  consecutive training tokens (a per-latent counter, saturating at the threshold);
- optionally (``resample_every`` > 0), every that many steps the latents that have not fired for
  ``resample_window`` tokens are resampled toward badly reconstructed rows, their Adam state reset
  (``saepipe.training.resample``; the count is logged as ``resampled``);
- Adam (bias-corrected) with peak ``learning_rate`` (None: ``default_learning_rate(d_hidden)``,
  3e-3 * sqrt(9216 / d_hidden), recorded in the SAE's config), linear warmup then ``lr_decay``; the
  gradient component parallel to each decoder row is removed before clipping the global norm
  (``gradient_clip``, 0 = off) and the rows are renormalized after each step;
- each epoch visits the training rows in a seeded permutation, ``batch_size`` rows per step (the
  remainder that does not fill a batch is skipped that epoch); rows are read with
  ``source.take(sorted indices)`` one batch at a time (one batch prefetched), never all at once;
- ``validation_split`` of the rows (chosen by seed) is held out and scored at each epoch end;
- checkpoints (one safetensors file: weights, Adam state, dead counters; JSON position in its
  header) every ``checkpoint_every`` steps and at each epoch end; a run resumes from a matching
  checkpoint and reaches the same weights as an uninterrupted run; a NaN/Inf stops training with
  ``TrainingDivergedError`` and leaves the last good checkpoint.

Kernels (same math, see ``saepipe.training.steps``): on a CPU ``fit_sae`` runs
``saepipe.training.cpu_step.CpuStep`` (MLX matmul + multi-threaded numba kernels), elsewhere
``saepipe.training.mlx_step.make_train_step``; both are tested against the dense reference step
``saepipe.training.reference`` (``kernels="reference"``). What all steps share (state, update, dead
counters, AuxK) is ``saepipe.training.state``.

Data-parallel (``ranks``: the ``mx.distributed`` group ``mlx.launch`` started, see the README): the
run plan, the seeded batch order and the schedule are the same on every rank; each rank reads its
contiguous part of every global batch (``Ranks.part``), the steps all-sum what the update needs
(``saepipe.training.state``), so every rank holds the weights one process would reach with the same
global batch and seed (up to float rounding). Normalization stats (when fit here) and validation
are split over the ranks too. Rank 0 alone reads the checkpoint it resumes from (the state and
position are broadcast to the others: no shared filesystem needed for checkpoints), writes
checkpoints, logs (dvclive, W&B, the given ``logger``) and shows progress; every rank returns the
same ``FitResult`` and the caller saves it on rank 0. A checkpoint resumes with any number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np
from tqdm.auto import tqdm

from saepipe.activations.normalize import fit_stats
from saepipe.activations.sources import ActivationSource, ArraySource, as_source
from saepipe.activations.stats import NormStats
from saepipe.parallel.ranks import Ranks
from saepipe.runtime.memory import reuse_freed_memory
from saepipe.runtime.params import Int
from saepipe.sae.config import SAEConfig, default_learning_rate
from saepipe.sae.normalization import InputNormalizer
from saepipe.sae.topk import TopKSAE, init_params
from saepipe.training import resample
from saepipe.training.checkpoint import all_finite, resume, save_checkpoint
from saepipe.training.schedule import Split, epoch_batches, learning_rate_at, split_rows
from saepipe.training.state import METRICS, AuxK, StepRunner, TrainState, count_dead, initial_state
from saepipe.training.steps import make_runner, resolve_kernels
from saepipe.training.tracking import DVCLiveLogger, MultiLogger, TrainLogger, WandbLogger
from saepipe.training.validation import make_eval, validate

log = logging.getLogger(__name__)

_READ_ROWS = 65536  # rows read at a time when fitting normalization stats on the training rows


class FitResult(NamedTuple):
    sae: TopKSAE
    """The trained SAE (metadata filled in: config, summary, stats digest, ...)."""
    history: list[dict[str, float]]
    """One entry per finished epoch: mean training metrics of the epoch and the validation metrics."""
    summary: dict[str, Any]
    """Final figures: steps, tokens, seconds, tok_per_s, last epoch's train/* and val/* metrics."""


class TrainingDivergedError(FloatingPointError):
    """A training metric became NaN or Inf."""


class RunPlan(NamedTuple):
    """What a run trains on and how: fixed before its first step."""

    source: ActivationSource
    split: Split
    config: SAEConfig
    mean: mx.array
    """(d_model,) input normalization mean (zeros without normalization)."""
    std: mx.array
    """(d_model,) input normalization std (ones without normalization)."""
    d_hidden: int
    auxk: AuxK
    batch_size: int
    """Rows per step: the config's, or all training rows when there are fewer."""
    steps_per_epoch: int
    total_steps: int
    run_info: dict[str, Any]
    """What identifies the run (config, data, stats): a checkpoint resumes only the same run."""
    checkpoint_dir: Path | None
    max_steps: int | None
    kernels: str
    ranks: Ranks
    """This process's rank (a single process: ``Ranks()``)."""


@dataclass
class Progress:
    """Where a run is: checkpoints save it (as JSON) and a resumed run continues from it."""

    step: int = 0
    """Optimisation steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batch: int = 0
    """Batches of the current epoch done."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per finished epoch (``FitResult.history``)."""
    epoch_sums: list[float] = field(default_factory=lambda: [0.0] * len(METRICS))
    """Sums of the ``METRICS`` over the current epoch's steps."""
    epoch_steps: int = 0
    seconds: float = 0.0
    """Time spent in steps (reading included, validation and checkpoints not)."""
    first_loss: float | None = None
    last_loss: float | None = None
    resampled: int = 0
    """Latents resampled so far (``SAEConfig.resample_every``)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, position: dict[str, Any]) -> Progress:
        return cls(**position)

    def after_step(self, values: list[float], started: float) -> None:
        """Account for one step that began at ``time.perf_counter() == started``."""
        self.step += 1
        self.batch += 1
        self.epoch_steps += 1
        self.epoch_sums = [s + val for s, val in zip(self.epoch_sums, values, strict=True)]
        self.seconds = self.seconds + time.perf_counter() - started
        self.last_loss = values[METRICS.index("loss")]
        if self.first_loss is None:
            self.first_loss = self.last_loss

    def epoch_means(self) -> dict[str, float]:
        """``train/<metric>``: the mean of each metric over the current epoch's steps."""
        return {f"train/{n}": s / max(1, self.epoch_steps) for n, s in zip(METRICS, self.epoch_sums, strict=True)}

    def end_epoch(self, entry: dict[str, float]) -> None:
        self.epoch += 1
        self.batch = 0
        self.history.append(entry)
        self.epoch_sums = [0.0] * len(METRICS)
        self.epoch_steps = 0


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
    ranks: Ranks | None = None,
) -> FitResult:
    """Train a TopK SAE on ``activations`` ((n, d_model) array, shard folder or ActivationSource).

    ``stats``: normalization stats to use when ``config.normalize_input`` (fit on the training rows
    when None). ``metadata``: recorded in the SAE (layer, component, model_name, model_hash, ...).
    ``checkpoint_dir``: where checkpoints go; a checkpoint there from the same config and data is
    resumed. ``live_dir``: a dvclive folder for metrics. ``logger``: extra ``TrainLogger``.
    ``log_every``: steps between logged step metrics. ``max_steps``: stop after this many steps in
    total (checkpointing when ``checkpoint_dir`` is set; the schedule still spans the full run).
    ``kernels``: "auto" (default: the fastest for this device), "cpu", "sparse" or "reference"
    (dense MLX ops), see ``saepipe.training.steps``. ``ranks``: data-parallel training over an
    ``mx.distributed`` group (default ``Ranks.world()``: the group ``mlx.launch`` started, else this
    process alone); every rank passes the same arguments and the same data.
    """
    kernels = resolve_kernels(kernels)
    if not isinstance(config, SAEConfig):
        raise TypeError(f"config must be an SAEConfig, not {type(config).__name__}")
    log_every = Int(min=1).check("log_every", log_every)
    max_steps = Int(min=0, optional=True).check("max_steps", max_steps)
    ranks = ranks if ranks is not None else Ranks.world()
    source = as_source(activations)
    if isinstance(source, ArraySource):  # in memory: cheap to check whole (shards were checked by extract)
        source.check_finite()
    d_hidden, auxk = _sizes(source, config)
    if config.learning_rate is None:  # the width's default, resolved once: the SAE's config records it
        config = config.replace(learning_rate=default_learning_rate(d_hidden))
    split = split_rows(source.n_rows, config.validation_split, config.seed)
    stats = _stats_for(source, config, stats, split, ranks)
    plan = _plan(source, config, split, stats, d_hidden, auxk, checkpoint_dir, max_steps, kernels, ranks)
    warnings = schedule_warnings(plan)
    for warning in warnings if ranks.is_main else ():
        log.warning("%s", warning)
    state, position, logs = _start(plan)
    meta = {**_source_metadata(source), **(metadata or {})}
    sink = _loggers(plan, meta, logger, live_dir, log_every, resumed=logs is not None)
    if logs is not None:
        sink.restore(logs, position.step)
    try:
        with reuse_freed_memory():  # the step's big buffers are reused, not page-faulted in anew
            state, position, completed = _train_loop(plan, state, position, sink, progress and ranks.is_main)
    finally:
        sink.close()
    if ranks.distributed:
        ranks.check_same("the final weights", _checksums(state))
    summary = {**_summary(plan, position, state, completed), "warnings": warnings}
    return FitResult(_trained_sae(plan, state, stats, meta, summary), list(position.history), summary)


def _start(plan: RunPlan) -> tuple[TrainState, Progress, dict[str, Any] | None]:
    """The state and position to start from (a checkpoint of the same run, else a fresh start), and
    the loggers' files saved with the checkpoint (None for a fresh start; ``{}`` on ranks other than
    0, which log nothing). With several ranks rank 0 decides and the others receive its state and
    position."""
    ranks = plan.ranks
    if not ranks.is_main:
        return _receive_start(plan)
    resumed = resume(plan.checkpoint_dir, plan.run_info)
    logs = None
    if resumed is not None:
        state, info = resumed
        position, logs = Progress.from_json(info["position"]), info["logs"] or {}
        log.info("resuming from %s at step %d", plan.checkpoint_dir, position.step)
    else:
        state = initial_state(plan.source, plan.split.train, plan.config, plan.source.d_model, plan.d_hidden,
                              plan.mean, plan.std)
        position = Progress()
    if ranks.distributed:
        ranks.broadcast_bytes(json.dumps({"position": position.to_json(), "resumed": resumed is not None}).encode())
        ranks.broadcast(_state_arrays(state))
    return state, position, logs


def _receive_start(plan: RunPlan) -> tuple[TrainState, Progress, dict[str, Any] | None]:
    """Rank 0's start (see ``_start``) on another rank."""
    header = json.loads(plan.ranks.broadcast_bytes(None))
    params = init_params(plan.source.d_model, plan.d_hidden, plan.config.tied_weights, plan.config.seed)
    zeros = {n: mx.zeros_like(p) for n, p in params.items()}
    like = TrainState(params, zeros, dict(zeros), mx.array(0.0), mx.zeros((plan.d_hidden,), dtype=mx.int32))
    arrays = plan.ranks.broadcast(_state_arrays(like))
    state = TrainState({n: arrays[f"params.{n}"] for n in params}, {n: arrays[f"m.{n}"] for n in params},
                       {n: arrays[f"v.{n}"] for n in params}, arrays["t"], arrays["counter"])
    return state, Progress.from_json(header["position"]), {} if header["resumed"] else None


MIN_STEPS = 100
"""Fewer optimisation steps than this is too short a run to train a TopK SAE (a warning)."""

TIMINGS = ("train_seconds", "tok_per_s")
"""Summary keys that measure the machine, not the SAE: in metrics.json only, never in the SAE file, so
identical runs write byte-identical SAE files."""


def schedule_warnings(plan: RunPlan) -> list[str]:
    """What makes this run too short for its own settings (each logged as a warning, listed in the
    summary as ``warnings``, and failing evaluate's ``schedule_ok`` health check)."""
    config, n_train, total = plan.config, len(plan.split.train), plan.total_steps
    out = []
    if config.batch_size > n_train:
        out.append(f"sae.batch_size={config.batch_size} is more than the {n_train} training rows: every step "
                   f"uses all of them ({total} steps in all); lower sae.batch_size or extract more tokens")
    if total <= config.warmup_steps:
        out.append(f"the run has {total} steps but sae.warmup_steps={config.warmup_steps}: the learning rate "
                   f"never reaches sae.learning_rate; lower warmup_steps or batch_size, or train longer")
    if total < MIN_STEPS:
        out.append(f"only {total} optimisation steps (< {MIN_STEPS}): too few to train a TopK SAE; lower "
                   "sae.batch_size, raise sae.num_epochs or extract more tokens")
    tokens = total * plan.batch_size
    if config.aux_coef > 0 and tokens < config.dead_tokens_threshold:
        out.append(f"sae.dead_tokens_threshold={config.dead_tokens_threshold} is more than the {tokens} tokens "
                   "the run trains on: no latent can be found dead, so AuxK never acts")
    return out


def _state_arrays(state: TrainState) -> dict[str, mx.array]:
    """A ``TrainState`` as one flat dict of arrays (what ``Ranks.broadcast`` sends)."""
    arrays = {f"{group}.{n}": a for group in ("params", "m", "v") for n, a in getattr(state, group).items()}
    return {**arrays, "t": state.t, "counter": state.counter}


def _trained_sae(plan: RunPlan, state: TrainState, stats: NormStats | None, meta: dict[str, Any],
                 summary: dict[str, Any]) -> TopKSAE:
    """The SAE of the final state, with what it was trained on and how in its metadata."""
    config = plan.config
    sae = TopKSAE(plan.source.d_model, config.expansion_factor, config.k, tied_weights=config.tied_weights,
                  stats=stats, normalization=config.normalization)
    sae.update(dict(state.params))
    untimed = {k: v for k, v in summary.items() if k not in TIMINGS}
    sae.update_metadata(**meta, config=config.to_dict(), summary=untimed, n_train_rows=len(plan.split.train),
                        n_val_rows=len(plan.split.val))
    return sae


def _stats_for(source: ActivationSource, config: SAEConfig, stats: NormStats | None,
               split: Split, ranks: Ranks) -> NormStats | None:
    """The stats the run normalizes with: None without ``normalize_input``, else the given ones
    (checked against the data) or ones fit on the training rows (split over the ranks)."""
    if not config.normalize_input:
        return None
    if stats is None:
        return fit_stats(source, _READ_ROWS, rows=split.train, ranks=ranks)
    if np.asarray(stats.mean).shape != (source.d_model,):
        raise ValueError(f"stats are for d_model {np.asarray(stats.mean).shape[0]}, activations have {source.d_model}")
    return stats


def _sizes(source: ActivationSource, config: SAEConfig) -> tuple[int, AuxK]:
    """d_hidden and the AuxK settings; a k that does not fit is an error before any work."""
    d_hidden = source.d_model * config.expansion_factor
    if config.k > d_hidden:
        raise ValueError(f"k={config.k} exceeds d_hidden={d_hidden} "
                         f"(d_model {source.d_model} x {config.expansion_factor})")
    return d_hidden, AuxK.from_config(config, source.d_model, d_hidden)


def _plan(source: ActivationSource, config: SAEConfig, split: Split, stats: NormStats | None, d_hidden: int,
          auxk: AuxK, checkpoint_dir: str | Path | None, max_steps: int | None, kernels: str,
          ranks: Ranks) -> RunPlan:
    d_model, n_rows = source.d_model, source.n_rows
    batch_size = min(config.batch_size, len(split.train))
    steps_per_epoch = len(split.train) // batch_size
    norm = InputNormalizer(stats, config.normalization) if stats is not None else None
    run_info = {
        "config": config.to_dict(), "d_model": d_model, "n_rows": n_rows, "n_train": len(split.train),
        "n_val": len(split.val), "stats_digest": stats.digest() if stats is not None else None,
        "activations_digest": _source_metadata(source).get("activations_digest"),
    }
    return RunPlan(
        source=source, split=split, config=config,
        mean=norm.mean if norm else mx.zeros((d_model,)), std=norm.std if norm else mx.ones((d_model,)),
        d_hidden=d_hidden, auxk=auxk, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * config.num_epochs, run_info=run_info,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        max_steps=max_steps, kernels=kernels, ranks=ranks,
    )


def _loggers(plan: RunPlan, meta: dict[str, Any], logger: TrainLogger | None, live_dir: str | Path | None,
             log_every: int, *, resumed: bool) -> MultiLogger:
    """The loggers of the run (the caller's, dvclive, W&B), with the run's configuration logged;
    none on ranks other than 0."""
    config = plan.config
    if not plan.ranks.is_main:
        return MultiLogger([])
    loggers: list[TrainLogger] = [logger] if logger is not None else []
    if live_dir is not None:
        loggers.append(DVCLiveLogger(live_dir, log_every=log_every, resume=resumed))
    if config.use_wandb:
        loggers.append(WandbLogger(config.wandb_project, config.wandb_name, config.wandb_tags, log_every))
    sink = MultiLogger(loggers)
    sink.log_config({**config.to_dict(), "d_model": plan.source.d_model, "d_hidden": plan.d_hidden,
                     "layer": meta.get("layer"), "component": meta.get("component"),
                     "n_rows": plan.source.n_rows, "n_train": len(plan.split.train), "n_val": len(plan.split.val),
                     "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps})
    return sink


def _source_metadata(source: ActivationSource) -> dict[str, Any]:
    """Site and model identity from a shard folder's manifest (empty for arrays)."""
    manifest = getattr(source, "manifest", None)
    if not isinstance(manifest, dict):
        return {}
    keys = {"model_id": "model_name", "model_hash": "model_hash", "layer": "layer", "component": "component",
            "site": "site", "digest": "activations_digest", "n_tokens": "activations_rows",
            "context_length": "context_length", "skip_special_tokens": "skip_special_tokens"}
    return {ours: manifest[theirs] for theirs, ours in keys.items() if manifest.get(theirs) is not None}


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
class _Loop(NamedTuple):
    """What the loop's pieces share besides the plan and the progress."""

    runner: StepRunner
    sink: MultiLogger
    bar: Any
    """The tqdm progress bar (tokens)."""
    reader: ThreadPoolExecutor
    """Reads the next batch while the current step runs."""


def _train_loop(plan: RunPlan, state: TrainState, position: Progress, sink: MultiLogger,
                show_progress: bool) -> tuple[TrainState, Progress, bool]:
    """Epochs of steps from ``position``; returns (state, position, completed)."""
    runner = make_runner(plan.config, plan.d_hidden, plan.auxk, plan.kernels, state, plan.ranks)
    evaluate = make_eval(plan.config, plan.d_hidden, plan.kernels)
    n_dead = count_dead(state.counter, plan.config.dead_tokens_threshold)
    bar = tqdm(total=plan.total_steps * plan.batch_size, initial=position.step * plan.batch_size, unit="tok",
               unit_scale=True, disable=not show_progress, desc="train", dynamic_ncols=True)
    loop = _Loop(runner, sink, bar, ThreadPoolExecutor(max_workers=1))
    try:
        for epoch in range(position.epoch, plan.config.num_epochs):
            n_dead, stopped = _run_epoch(plan, loop, position, epoch, n_dead)
            if stopped:
                _checkpoint(plan, runner, position, sink)
                return runner.state(), position, False
            _end_epoch(plan, loop, evaluate, position, epoch)
    finally:
        loop.reader.shutdown(wait=True)
        bar.close()
    return runner.state(), position, True


def _run_epoch(plan: RunPlan, loop: _Loop, position: Progress, epoch: int, n_dead: int) -> tuple[int, bool]:
    """The steps of ``epoch`` from ``position.batch`` on; returns (dead latents, stopped at max_steps)."""
    batches = [plan.ranks.part(b) for b in epoch_batches(plan.split.train, plan.config.seed, epoch, plan.batch_size)]
    start = position.batch
    pending: Future | None = loop.reader.submit(plan.source.take, batches[start]) if start < len(batches) else None
    for b in range(start, len(batches)):
        if plan.max_steps is not None and position.step >= plan.max_steps:
            return n_dead, True
        started = time.perf_counter()
        x = mx.array(pending.result())
        if b + 1 < len(batches):
            pending = loop.reader.submit(plan.source.take, batches[b + 1])
        n_dead = _step(plan, loop, position, x, n_dead, started)
        every = plan.config.checkpoint_every
        if every and position.step % every == 0 and b + 1 < len(batches):  # epoch ends checkpoint anyway
            _checkpoint(plan, loop.runner, position, loop.sink)
    return n_dead, False


def _step(plan: RunPlan, loop: _Loop, position: Progress, x: mx.array, n_dead: int, started: float) -> int:
    """One optimisation step (then a resampling of dead latents when one is due), logged; returns the
    number of dead latents after it."""
    lr = learning_rate_at(position.step, plan.total_steps, plan.config)
    values = loop.runner.step(lr, x, plan.mean, plan.std, n_dead)
    _check_finite(values, position.step + 1, plan.checkpoint_dir, x)
    record = dict(zip(METRICS, values.tolist(), strict=True))
    record["learning_rate"] = lr
    position.after_step(values.tolist(), started)
    n_dead = round(record["dead_fraction"] * plan.d_hidden)
    if resample.due(position.step, plan.config, plan.total_steps):
        n_dead = _resample(plan, loop.runner, position, record, n_dead)
    loop.sink.log_step(position.step, record)
    loop.bar.update(plan.batch_size)
    loop.bar.set_postfix(loss=f"{record['loss']:.4f}", L0=f"{record['l0']:.1f}",
                         dead=f"{record['dead_fraction']:.3f}", refresh=False)
    return n_dead


def _resample(plan: RunPlan, runner: StepRunner, position: Progress, record: dict[str, float], n_dead: int) -> int:
    """Resample the dead latents after step ``position.step`` (``saepipe.training.resample``): the
    runner continues from the new state; ``record["resampled"]`` and ``position.resampled`` count
    them. Returns the number of dead latents now."""
    state = runner.state()
    latents = np.zeros(0, np.int64)
    if resample.dead_latents(state.counter, plan.config).size:  # the counters agree on every rank
        ranks = plan.ranks
        if ranks.is_main:
            rows = resample.sample_rows(plan.split.train, plan.config, position.step)
            x = (plan.source.take(rows) - np.asarray(plan.mean)) / np.asarray(plan.std)
            state, latents = resample.resample(state, x, plan.config, position.step)
        if ranks.distributed:  # rank 0's draw and new state on every rank (the same bits, not a re-run)
            latents = np.asarray(json.loads(ranks.broadcast_bytes(json.dumps(latents.tolist()).encode())),
                                 dtype=np.int64)
            arrays = ranks.broadcast(_state_arrays(state))
            state = TrainState({n: arrays[f"params.{n}"] for n in state.params}, {n: arrays[f"m.{n}"] for n in state.m},
                               {n: arrays[f"v.{n}"] for n in state.v}, arrays["t"], arrays["counter"])
        if latents.size:
            runner.load(state)
            n_dead = count_dead(state.counter, plan.config.dead_tokens_threshold)
    record["resampled"] = float(latents.size)
    position.resampled += int(latents.size)
    log.info("step %d: resampled %d dead latents", position.step, latents.size)
    return n_dead


def _end_epoch(plan: RunPlan, loop: _Loop, evaluate: Any, position: Progress, epoch: int) -> None:
    """Validate, log, record the epoch in the history and checkpoint."""
    val = validate(plan.source, plan.split.val, evaluate, loop.runner.state().params, plan.mean, plan.std,
                   plan.d_hidden, plan.config, plan.ranks)
    entry = {"epoch": epoch, "step": position.step, **position.epoch_means(), **val}
    loop.sink.log_epoch(epoch, position.step, val)
    position.end_epoch(entry)
    _checkpoint(plan, loop.runner, position, loop.sink)


def _checkpoint(plan: RunPlan, runner: StepRunner, position: Progress, sink: MultiLogger) -> None:
    """Save the current state, position and logs (when the run has a checkpoint folder; rank 0 only,
    after checking that every rank holds the same weights); never a diverged one."""
    if plan.checkpoint_dir is None:
        return
    current = runner.state()
    if plan.ranks.distributed:
        plan.ranks.check_same(f"the weights after step {position.step}", _checksums(current))
    if not all_finite(current.params):
        raise TrainingDivergedError(f"non-finite weights after step {position.step}; "
                                    f"last good checkpoint kept in {plan.checkpoint_dir}")
    if plan.ranks.is_main:
        save_checkpoint(plan.checkpoint_dir, current,
                        {"run": plan.run_info, "position": position.to_json(), "logs": sink.state()})


def _checksums(state: TrainState) -> list[float]:
    """Order-sensitive float64 checksums of the weights and dead counters (ranks compare them)."""
    out = []
    for a in [*(state.params[n] for n in sorted(state.params)), state.counter]:
        flat = np.asarray(a, dtype=np.float64).reshape(-1)
        out.append(float(flat @ np.cos(np.arange(flat.size) * 0.618)))
    return out


def _check_finite(values: np.ndarray, step: int, ckpt_dir: Path | None, x: mx.array) -> None:
    """Stop on a NaN/Inf metric, blaming the input batch when it holds one, else the optimisation."""
    bad = [name for name, val in zip(METRICS, values, strict=True) if not math.isfinite(val)]
    if bad:
        kept = f"; last good checkpoint kept in {ckpt_dir}" if ckpt_dir is not None else ""
        finite = np.isfinite(np.asarray(x))
        if not finite.all():
            rows = int((~finite).any(axis=1).sum())
            raise TrainingDivergedError(
                f"the training activations hold NaN or inf ({rows} of the {finite.shape[0]} rows of the batch of "
                f"step {step}): fix the input (check the model and the extract stage; extract.dtype float16 "
                f"overflows above 65504), not the learning rate{kept}")
        raise TrainingDivergedError(
            f"training diverged at step {step}: {', '.join(bad)} is {values[METRICS.index(bad[0])]}"
            f" (try a lower learning_rate or gradient_clip){kept}")


def _summary(plan: RunPlan, position: Progress, state: TrainState, completed: bool) -> dict[str, Any]:
    tokens = position.step * plan.batch_size
    summary: dict[str, Any] = {
        "completed": completed, "steps": position.step, "epochs": position.epoch, "tokens": tokens,
        "train_seconds": round(position.seconds, 3),
        "tok_per_s": tokens / position.seconds if position.seconds > 0 else None,
        "n_train": len(plan.split.train), "n_val": len(plan.split.val),
        "initial_loss": position.first_loss, "final_loss": position.last_loss,
        "dead_fraction": float((np.asarray(state.counter) >= plan.config.dead_tokens_threshold).mean()),
    }
    if plan.config.resample_every:
        summary["resampled_latents"] = position.resampled
    if position.history:
        summary.update({k: v for k, v in position.history[-1].items() if k not in ("epoch", "step")})
    return summary


__all__ = ["MIN_STEPS", "TIMINGS", "FitResult", "Progress", "RunPlan", "TrainingDivergedError", "fit_sae",
           "schedule_warnings"]
