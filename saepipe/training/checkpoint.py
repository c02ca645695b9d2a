"""Resumable checkpoints: one safetensors file with the ``TrainState`` and a JSON header.

The header holds ``{"run": <what the run trains on and with>, "position": <where it is>, "logs":
<the loggers' files up to here>}`` and the sha256 of the tensors. A run resumes a checkpoint only when
its ``run`` part is the same (same config, data and stats), so a resumed run reaches the same weights
as an uninterrupted one, and its loggers restart from ``logs`` (the dvclive curves keep their early
steps even after DVC removed the outputs of the killed run). The file is replaced atomically: a crash
while writing keeps the previous checkpoint; a checkpoint whose tensors do not match their sha256 is
ignored with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors import safe_open

from saepipe.runtime.files import arrays_sha256, write_safetensors
from saepipe.training.state import TrainState

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
_HEADER_KEY = "saepipe_checkpoint"
_DIGEST_KEY = "tensors_sha256"


def save_checkpoint(directory: Path, state: TrainState, info: dict[str, Any]) -> Path:
    """Write ``state`` and ``info`` (JSON) to ``directory/CHECKPOINT_NAME``, replacing it atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"params.{n}": np.asarray(a) for n, a in state.params.items()}
    tensors |= {f"adam_m.{n}": np.asarray(a) for n, a in state.m.items()}
    tensors |= {f"adam_v.{n}": np.asarray(a) for n, a in state.v.items()}
    tensors["adam_t"] = np.asarray(state.t).reshape(1)
    tensors["dead_counter"] = np.asarray(state.counter)
    header = {_HEADER_KEY: json.dumps(info), _DIGEST_KEY: arrays_sha256(tensors)}
    return write_safetensors(directory / CHECKPOINT_NAME, tensors, header)


def load_checkpoint(directory: Path) -> tuple[TrainState, dict[str, Any]] | None:
    """The state and info of ``directory``'s checkpoint; None when there is none or it is unreadable."""
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            info = json.loads(header[_HEADER_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:
        log.warning("ignoring unreadable checkpoint %s (%s)", path, err)
        return None
    if header.get(_DIGEST_KEY) not in (None, arrays_sha256(tensors)):
        log.warning("ignoring checkpoint %s: its tensors do not match their sha256 (damaged)", path)
        return None

    def group(prefix: str) -> dict:
        return {k[len(prefix):]: mx.array(a) for k, a in tensors.items() if k.startswith(prefix)}

    state = TrainState(group("params."), group("adam_m."), group("adam_v."),
                       mx.array(tensors["adam_t"].reshape(())), mx.array(tensors["dead_counter"]))
    return state, info


def resume(directory: Path | None, run_info: dict[str, Any]) -> tuple[TrainState, dict[str, Any]] | None:
    """``(state, info)`` of a checkpoint in ``directory`` made by the same run, else None; ``info`` has
    ``position`` and ``logs`` (None in checkpoints made before logs were saved)."""
    if directory is None:
        return None
    loaded = load_checkpoint(directory)
    if loaded is None:
        return None
    state, info = loaded
    if info.get("run") != json.loads(json.dumps(run_info)):
        log.warning("checkpoint in %s is from another config or data; starting afresh", directory)
        return None
    return state, {"position": info["position"], "logs": info.get("logs")}


def all_finite(params: dict[str, mx.array]) -> bool:
    """Whether every parameter is free of NaN and Inf (a diverged state is never checkpointed)."""
    return all(bool(mx.all(mx.isfinite(p)).item()) for p in params.values())


__all__ = ["CHECKPOINT_NAME", "all_finite", "load_checkpoint", "resume", "save_checkpoint"]
