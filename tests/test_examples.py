"""Run each example end to end (default model, tiny sizes) in a subprocess, as a user would."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num-texts", "16", "--layer", "1", "--context-length", "16", "--expansion-factor", "2",
         "--k", "8", "--epochs", "1", "--batch-size", "64"]

pytestmark = pytest.mark.slow


def run_example(name: str, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args, "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1", **env},
    )


def test_quickstart(tmp_path):
    out = run_example("sae_quickstart.py", SMALL, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "✓ SAE is compatible!" in out.stdout
    assert "8/1152 features active" in out.stdout  # exactly k of d_hidden = 2 x 576
    assert (tmp_path / "sae_layer1_mlp.mlx").is_file()


def test_realistic_training_falls_back_offline(tmp_path):
    out = run_example("sae_realistic_training.py",
                      [*SMALL, "--eval-texts", "4", "--dataset", "saepipe-test/no-such-dataset"], tmp_path,
                      HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "falling back to the built-in offline corpus" in out.stderr
    assert "16 training texts, 4 held-out texts" in out.stdout
    assert "epoch 0: train loss" in out.stdout and "held-out:" in out.stdout
    assert (tmp_path / "sae_saepipe-test/no-such-dataset_layer1_mlp.mlx").is_file()


def test_wandb_example(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sae_with_wandb.py"), *SMALL, "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**env, "TQDM_DISABLE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    if importlib.util.find_spec("wandb") is None:
        assert out.returncode == 2
        assert "./saepipe.sh --extra wandb" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-3000:]
    assert "offline mode" in out.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "sae_wandb_layer1_mlp.mlx").is_file()
