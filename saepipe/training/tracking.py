"""Training loggers: DVCLive (always, for the pipeline's plots) and Weights & Biases (optional).

``fit_sae`` calls a ``TrainLogger`` with plain metric dicts; loggers only rename and forward them.

Metric names sent by ``fit_sae``: per step ``loss``, ``recon_mse``, ``fvu``, ``l0``,
``dead_fraction``, ``aux_loss``, ``l1_loss``, ``learning_rate``, ``grad_norm`` (and ``resampled``,
the number of latents resampled, at each step that resampled: always logged); per epoch
``val/loss``, ``val/mse``, ``val/fvu``, ``val/l0``, ``val/dead_fraction``. DVCLive writes them under
these names (``plots/metrics/loss.tsv``, ``plots/metrics/val/loss.tsv``, ...). W&B uses mlxterp's
names: ``train/loss``, ``train/recon_loss`` (= fvu), ``train/l0``, ``train/dead_fraction``,
``train/l1_loss``, ``train/learning_rate``, ``train/aux_loss``, ``train/resampled``, ``val/loss``,
``val/l0``, ``val/dead_fraction``, ``val/fvu``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class TrainLogger(Protocol):
    """What ``fit_sae`` calls. A logger may also define ``state() -> dict`` (what it wrote so far, saved
    in each checkpoint) and ``restore(state, step)`` (called once on resume, before any other call but
    ``log_config``, with the checkpoint's step): a resumed run then ends with the same logs as an
    uninterrupted one."""

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the run configuration once, before the first step."""
        ...

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics after optimisation step ``step`` (1-based)."""
        ...

    def log_epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """Validation metrics at the end of ``epoch`` (0-based), reached at ``step``."""
        ...

    def close(self) -> None: ...


class DVCLiveLogger:
    """Per-step metrics every ``log_every`` steps and per-epoch validation metrics to a dvclive dir."""

    def __init__(self, directory: str | Path, log_every: int = 10, resume: bool = False) -> None:
        from dvclive import Live  # lazy: seconds to import, and only runs with a live folder use it

        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.log_every = log_every
        self.directory = Path(directory)
        self.live = Live(str(directory), resume=resume, dvcyaml=False, save_dvc_exp=False)

    def state(self) -> dict[str, str]:
        """The per-step files written so far (``plots/metrics/**.tsv`` and ``metrics.json``) by path."""
        files = sorted((self.directory / "plots" / "metrics").rglob("*.tsv"))
        summary = self.directory / "metrics.json"
        files += [summary] if summary.is_file() else []
        return {f.relative_to(self.directory).as_posix(): f.read_text(encoding="utf-8") for f in files}

    def restore(self, state: dict[str, str], step: int) -> None:
        """Write back the files of ``state``, without rows past ``step`` (logged after the checkpoint)."""
        for name, text in state.items():
            path = self.directory / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise ValueError(f"checkpoint logs name a file outside the log folder: {name!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_rows_up_to(text, step) if path.suffix == ".tsv" else text, encoding="utf-8")
        summary = self.directory / "metrics.json"
        if summary.is_file():
            self.live.summary = json.loads(summary.read_text(encoding="utf-8"))

    def log_config(self, config: dict[str, Any]) -> None:
        self.live.log_params(_flat(config))

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.log_every and step != 1 and "resampled" not in metrics:  # resamplings are rare: all logged
            return
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, float(value))
        self.live.make_summary()

    def log_epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        self.live.log_metric("epoch", epoch)
        for name, value in metrics.items():
            self.live.log_metric(name, float(value))
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


_WANDB_STEP_NAMES = {
    "loss": "train/loss",
    "fvu": "train/recon_loss",
    "l0": "train/l0",
    "dead_fraction": "train/dead_fraction",
    "l1_loss": "train/l1_loss",
    "learning_rate": "train/learning_rate",
    "aux_loss": "train/aux_loss",
    "resampled": "train/resampled",
}


class WandbLogger:
    """Weights & Biases run with mlxterp's metric names; needs the ``wandb`` extra."""

    def __init__(self, project: str | None, name: str | None, tags: tuple[str, ...] = (),
                 log_every: int = 10) -> None:
        try:
            import wandb  # lazy: an optional extra (saepipe[wandb])
        except ImportError as err:
            raise ImportError("use_wandb is true but wandb is not installed: "
                              "`./saepipe.sh --extra wandb` (or pip install 'saepipe[wandb]')") from err
        self.wandb = wandb
        self.log_every = log_every
        self.run = wandb.init(project=project, name=name, tags=list(tags) or None)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.log_every and step != 1 and "resampled" not in metrics:
            return
        self.run.log({_WANDB_STEP_NAMES[k]: v for k, v in metrics.items() if k in _WANDB_STEP_NAMES}, step=step)

    def log_epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.run.log({"epoch": epoch, **metrics}, step=step)

    def close(self) -> None:
        self.run.finish()


def _rows_up_to(tsv: str, step: int) -> str:
    """A dvclive metric file without the rows whose ``step`` column is past ``step``."""
    lines = tsv.splitlines(keepends=True)
    if not lines:
        return tsv
    column = lines[0].rstrip("\r\n").split("\t").index("step")
    kept = [line for line in lines[1:] if line.strip() and int(line.split("\t")[column]) <= step]
    return "".join([lines[0], *kept])


class MultiLogger:
    """Forward every call to several loggers."""

    def __init__(self, loggers: list[TrainLogger]) -> None:
        self.loggers = list(loggers)

    def state(self) -> dict[str, Any]:
        """Each logger's ``state()`` by its class name (loggers without one are left out)."""
        return {type(lg).__name__: lg.state() for lg in self.loggers if hasattr(lg, "state")}

    def restore(self, state: dict[str, Any] | None, step: int) -> None:
        """Give each logger its part of a checkpoint's ``state`` (see ``TrainLogger``)."""
        for lg in self.loggers:
            part = (state or {}).get(type(lg).__name__)
            if part is not None and hasattr(lg, "restore"):
                lg.restore(part, step)

    def log_config(self, config: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_config(config)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.log_step(step, metrics)

    def log_epoch(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.log_epoch(epoch, step, metrics)

    def close(self) -> None:
        for lg in self.loggers:
            try:
                lg.close()
            except Exception:  # one failing backend must not hide the others' files
                log.exception("closing logger %r failed", lg)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to ``a.b`` keys; lists/tuples made strings (dvclive params are scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = value
    return out


__all__ = ["DVCLiveLogger", "MultiLogger", "TrainLogger", "WandbLogger"]

