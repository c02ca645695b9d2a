"""A throwaway saepipe project for tests that run DVC itself: this checkout's code, dvc.yaml and
.dvcignore copied into a fresh git + DVC repository, a tiny random model saved as an mlx-lm folder,
and small params (seconds per stage). ``dvc`` runs in a subprocess of this interpreter.

The code is copied with its ``__pycache__`` folders and modification times, so the numba kernels
cached next to it (keyed by source path stamp) are reused instead of compiled again per project.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "PYTHONUNBUFFERED": "1"}

SMALL: dict[str, Any] = {
    "sweep": {"sites": ["1.mlp"], "variants": {"default": {}}},
    "prepare": {"source": "builtin", "min_chars": 40, "max_chars": 160, "max_texts": 240, "eval_fraction": 0.25,
                "seed": 0},
    "extract": {"context_length": 32, "batch_size": 16, "dtype": "float32", "max_tokens": 3000,
                "eval_max_tokens": 600, "skip_special_tokens": True, "shard_rows": 2048},
    "normalize": {"chunk_rows": 4096},
    "sae": {"expansion_factor": 2, "k": 4, "learning_rate": 0.003, "num_epochs": 1, "batch_size": 256,
            "warmup_steps": 2, "validation_split": 0.1, "checkpoint_every": 0, "dead_tokens_threshold": 1000},
    "evaluate": {"max_tokens": 300, "batch_size": 8},
    "analyze": {"top_n": 4, "window_before": 4, "window_after": 2, "quantiles": 2, "per_quantile": 1,
                "histogram_bins": 8, "logit_top": 3, "neighbors": 3, "token_top": 4, "chunk_rows": 1024,
                "splits": ["train", "eval"]},
}
"""Params of a tiny run (the model is added by ``make_project``)."""


def save_tiny_model(folder: Path) -> Path:
    """The tiny random Llama (4 blocks, d_model 64, byte tokenizer) as an mlx-lm folder."""
    import dataclasses

    from mlx_lm.utils import save_config, save_model

    from saepipe.lm.model import tiny_random_model

    lm = tiny_random_model()
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, lm.model)
    save_config({k: v for k, v in dataclasses.asdict(lm.model.args).items() if v is not None},
                folder / "config.json")
    lm.tokenizer.save_pretrained(str(folder))
    return folder


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, section by section (a section's keys replace base's)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _copy_code(dest: Path) -> None:
    ignore = shutil.ignore_patterns("*.tmp", "probe_*")
    for folder in ("saepipe", "stages"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore, copy_function=shutil.copy2)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, dest / name)


def run(args: list[str], cwd: Path, *, check: bool = True, timeout: float = 900,
        capture: bool = True) -> subprocess.CompletedProcess:
    """A command in ``cwd`` (``dvc ...`` runs as ``python -m dvc`` of this interpreter); output captured.

    ``capture=False`` for a command that leaves processes behind (``dvc queue start`` starts worker
    daemons): they would inherit the pipes, and waiting for the output would wait for them.
    """
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else args
    streams = {"capture_output": True} if capture else {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    res = subprocess.run(cmd, cwd=cwd, env=ENV, text=True, timeout=timeout, **streams)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}) in {cwd}:\n{res.stdout}\n{res.stderr}")
    return res


def make_project(dest: Path, model: Path, params: dict[str, Any]) -> Path:
    """A git + DVC repository at ``dest`` with this checkout's pipeline and ``params`` (committed).

    The model folder is copied to ``data/models/tiny`` (local models must be there: a DVC input of
    the stages that read it) and committed to git with the project, as a team would ``dvc add`` it.
    """
    dest.mkdir(parents=True)
    _copy_code(dest)
    for name in ("sources", "models"):
        (dest / "data" / name).mkdir(parents=True)
        shutil.copy2(ROOT / "data" / name / "README.md", dest / "data" / name / "README.md")
    shutil.copytree(model, dest / "data" / "models" / "tiny")
    write_params(dest, {"model": "data/models/tiny", **params})
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text() + "!/data/models/tiny/\n")
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    commit(dest, "project")
    return dest


def write_params(project: Path, params: dict[str, Any]) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read_params(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "params.yaml").read_text())


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-q", "-m", message, "--allow-empty"], project)


def ran_stages(output: str) -> list[str]:
    """Stage names of the ``Running stage '...'`` lines of ``dvc repro``/``dvc exp run`` output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def changed_stages(project: Path) -> set[str]:
    """Stages ``dvc status`` reports as changed (their own deps, params, cmd or outs), by name."""
    res = run(["dvc", "status", "--json"], project)
    return {name.split(":")[-1] for name in json.loads(res.stdout or "{}")}


def dry_run(project: Path, *extra: str) -> list[str]:
    """Stages ``dvc repro --dry`` would run (``--force-downstream``: and everything after them)."""
    return ran_stages(run(["dvc", "repro", "--dry", *extra], project).stdout)
