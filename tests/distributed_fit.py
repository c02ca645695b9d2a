"""Run by tests/test_distributed.py under ``mlx.launch -n 2 --backend ring``: data-parallel fits.

    mlx.launch -n 2 --backend ring -- python tests/distributed_fit.py OUT_DIR

Every rank trains the runs of ``RUNS`` (the same data and config as the test's one-process runs)
and writes its weights to ``OUT_DIR/<run>-rank<r>.npz`` plus ``OUT_DIR/<run>-rank<r>.json`` (summary
and history); the ``resume`` run stops after ``STOP_AT`` steps and is resumed by a second
``fit_sae`` call, with rank 1 given an empty checkpoint folder of its own (it must get rank 0's
state by broadcast).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import saepipe  # noqa: E402,F401  (fast BLAS before mlx)
from saepipe.parallel.ranks import Ranks  # noqa: E402
from saepipe.sae.config import SAEConfig  # noqa: E402
from saepipe.training.fit import fit_sae  # noqa: E402

STOP_AT = 5
"""Steps of the ``resume`` run before it is interrupted."""

RUNS = {"cpu": "cpu", "sparse": "sparse", "reference": "reference", "resume": "cpu"}
"""Each run's name and its kernels."""


def data() -> np.ndarray:
    """Activations with structure (a few directions plus noise), an offset and uneven scales."""
    rng = np.random.default_rng(7)
    basis = rng.normal(size=(24, 16))
    codes = rng.exponential(size=(700, 24)) * (rng.random((700, 24)) < 0.15)
    return (codes @ basis + 0.1 * rng.normal(size=(700, 16)) + 3.0).astype(np.float32) * np.linspace(0.5, 2, 16,
                                                                                                       dtype=np.float32)


def config() -> SAEConfig:
    """Small, and every global part of the step on: AuxK (a low dead threshold), clipping, L1,
    normalization fit during training, a validation split; 129 rows a batch (ranks get 64 and 65)."""
    return SAEConfig(expansion_factor=4, k=4, batch_size=129, num_epochs=2, learning_rate=3e-3,
                     warmup_steps=2, dead_tokens_threshold=129, aux_coef=1 / 32, k_aux=8, gradient_clip=0.5,
                     l1_coefficient=1e-3, validation_split=0.1, seed=3, checkpoint_every=2)


def save(out: Path, name: str, rank: int, result) -> None:
    np.savez(out / f"{name}-rank{rank}.npz", **{k: np.asarray(v) for k, v in result.sae.parameters().items()})
    (out / f"{name}-rank{rank}.json").write_text(json.dumps({"summary": result.summary, "history": result.history},
                                                            default=str))


def main(out: Path) -> None:
    ranks = Ranks.world()
    assert ranks.size == 2, f"run me with mlx.launch -n 2 (got {ranks})"
    out.mkdir(parents=True, exist_ok=True)
    acts, cfg = data(), config()
    for name, kernels in RUNS.items():
        if name == "resume":
            ckpt = out / ("ckpt" if ranks.is_main else "ckpt-rank1-empty")
            fit_sae(acts, cfg, kernels=kernels, ranks=ranks, progress=False, checkpoint_dir=ckpt, max_steps=STOP_AT)
            result = fit_sae(acts, cfg, kernels=kernels, ranks=ranks, progress=False, checkpoint_dir=ckpt)
        else:
            result = fit_sae(acts, cfg, kernels=kernels, ranks=ranks, progress=False)
        save(out, name, ranks.rank, result)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
