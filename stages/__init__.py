"""The click entry points DVC calls (``python -m stages.<name>``), and what they share.

``stage_run(name, out_dir)`` wraps a stage's body: it holds the stage's lock (one run per output
folder, see ``saepipe.runtime.locks``) and turns the errors a user can act on (a bad params key, a
missing, corrupt or stale input, a full disk, a diverged run) into one ``Error:`` line that says what
to change, instead of a traceback. ``SAEPIPE_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import click

from saepipe.runtime.locks import stage_lock
from saepipe.runtime.params import ParamsError, model_kind, model_spec

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ParamsError, corrupt or stale inputs, impossible settings
    KeyError,  # a missing column, split or key
    TypeError,  # a value of the wrong kind in an input file
    OSError,  # missing files, a full disk (ENOSPC), permissions
    FloatingPointError,  # training diverged (TrainingDivergedError)
    RuntimeError,  # StageBusyError; an unreachable hub dataset or model
    sqlite3.OperationalError,  # DVC's state database (dvclive opens it) on a full disk
)
"""Errors a stage reports as one line: they come from its inputs, params or machine, not from a bug."""


def message(err: BaseException) -> str:
    """The text of an error as a user reads it (a KeyError's str() would be quoted)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


def check_inside(key: str, value: str, folder: Path, what: str, stages: str) -> None:
    """A local ``value`` (``key`` in params.yaml) must be inside ``folder``, a DVC dependency of
    ``stages``; compared as written, so a symlink there may point anywhere (DVC hashes the target)."""
    path = Path(os.path.abspath(Path(value).expanduser()))
    root = Path(os.path.abspath(folder))
    if path == root or root in path.parents:
        return
    raise ParamsError(
        key, value, f"{what} under {folder}/",
        f"DVC only reruns {stages} when their inputs change, and it watches {folder}/. Move it there (or "
        f"symlink it: ln -s {path} {folder}/), set {key}: {folder}/{path.name}, and "
        f"`dvc add {folder}/{path.name}` to share it through the DVC remote")


MODELS_DIR = Path("data/models")
"""Where local model files and folders live (a folder dep of extract, evaluate and analyze in dvc.yaml)."""


def checked_model_spec(params: dict, models_dir: Path) -> str:
    """``model:`` of params; a local .gguf file or folder must be inside ``models_dir`` (DVC watches it)."""
    spec = model_spec(params)
    if model_kind(spec) == "local":
        check_inside("model", spec, models_dir, "default, a hub id, or a .gguf file or model folder",
                     "the stages that read the model (extract, evaluate, analyze)")
    return spec


@contextlib.contextmanager
def stage_run(stage: str, out_dir: Path) -> Iterator[None]:
    """Run a stage's body under its lock, reporting user errors as one line (exit status 1)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with stage_lock(out_dir, stage):
            yield
    except USER_ERRORS as err:
        if os.environ.get("SAEPIPE_DEBUG"):
            raise
        raise click.ClickException(message(err)) from err
