"""A tiny saepipe project for tests that run real ``dvc repro``: the shipped dvc.yaml, tiny params,
a tiny random Llama as a GGUF file under data/models/ and a few hundred texts under data/sources/.

The stages' code comes from this checkout through PYTHONPATH (its code deps are dropped from the
copied dvc.yaml, so numba's compiled kernels next to the code are reused); everything else (data,
params, the DVC state) lives in the project folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults"

STAGES = ("prepare", "extract", "normalize", "train", "evaluate")
"""The stages of the tiny project: the pipeline up to the SAE's evaluation (analyze and dashboard,
which read its outputs, are left out to keep the DVC tests short)."""

TINY_PARAMS = {
    "model": "data/models/tiny.gguf",
    "prepare": {"source": "data/sources/texts.jsonl", "min_chars": 20, "max_chars": 200, "max_texts": 400,
                "eval_fraction": 0.2, "seed": 0},
    "sweep": {"sites": ["1.mlp"], "variants": {"default": {}}},
    "extract": {"context_length": 48, "batch_size": 16, "dtype": "float32",
                "max_tokens": 6000, "eval_max_tokens": 1500, "skip_special_tokens": True, "shard_rows": 1024},
    "normalize": {"chunk_rows": 1000},
    "sae": {"expansion_factor": 4, "k": 8, "learning_rate": 0.003, "num_epochs": 2, "batch_size": 64,
            "warmup_steps": 5, "validation_split": 0.1, "checkpoint_every": 10, "dead_tokens_threshold": 2000,
            "seed": 0},
    "evaluate": {"max_tokens": 600, "batch_size": 16},
}

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "brew", "strange", "potions", "near", "an", "old", "stone", "bridge", "under", "silver", "moonlight", "and", "distant", "thunder"]


def texts(n: int = 400) -> list[str]:
    """Deterministic, distinct texts of 40-160 characters."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(8 + i % 20)]
        out.append(f"Text {i}: " + " ".join(words) + ".")
    return out


def write_tiny_gguf(path: Path) -> None:
    from saepipe.lm.model import tiny_random_model
    from tests.test_model import gguf_metadata, gguf_tensors

    lm = tiny_random_model(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2)
    mx.save_gguf(str(path), gguf_tensors(lm), gguf_metadata(lm))


def env(**extra: str) -> dict[str, str]:
    """The environment stages run in: this checkout's code first, offline, no colour."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SAEPIPE_TEST_", "DVC_"))}
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])  # `python` is ours
    e["PYTHONPATH"] = os.pathsep.join([str(FAULTS), str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", DVC_NO_ANALYTICS="1", NO_COLOR="1")
    from saepipe.runtime import blas

    if blas.loaded_path:  # every stage on the BLAS this process chose (a race on a cold cache may differ)
        e.setdefault(blas.ENV_VAR, blas.loaded_path)
    e.update(extra)
    return e


def make_project(folder: Path, params: dict | None = None) -> Path:
    """A git + DVC project in ``folder`` with the shipped dvc.yaml (code deps dropped) and tiny params."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in STAGES}
    for stage in pipeline["stages"].values():
        stage["deps"] = [d for d in stage["deps"] if not str(d).startswith(("stages/", "saepipe/"))]
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (folder / "params.yaml").write_text(yaml.safe_dump(params or TINY_PARAMS, sort_keys=False))
    (folder / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    for name in ("sources", "models"):
        (folder / "data" / name).mkdir(parents=True)
        shutil.copy(ROOT / "data" / name / "README.md", folder / "data" / name / "README.md")
    (folder / "data" / "sources" / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    write_tiny_gguf(folder / "data" / "models" / "tiny.gguf")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.autostage", "false"],
                ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny project"]):
        subprocess.run(cmd, cwd=folder, env=env(), check=True, capture_output=True)
    return folder


def dvc(folder: Path, *args: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in the project, with this checkout's code; output captured as text."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=folder, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)
