"""Run by tests/test_distributed.py under ``mlx.launch -n 2 --backend ring``: data-parallel work.

    mlx.launch -n 2 --backend ring -- python tests/distributed_fit.py OUT_DIR

``OUT_DIR`` holds what ``make_inputs`` wrote (texts and params). Every rank, in one launch (a launch
costs seconds):

1. trains the runs of ``RUNS`` on ``data()`` with ``run_config(name)`` (the test's one-process runs use the
   same) and writes its weights to ``OUT_DIR/<run>-rank<r>.npz`` plus summary and history to
   ``<run>-rank<r>.json``; the ``resume`` run stops after ``STOP_AT`` steps (its checkpoint is
   copied to ``ckpt-at-stop/``) and is resumed by a second ``fit_sae`` call, with rank 1 given an
   empty checkpoint folder of its own (it must get rank 0's state by broadcast);
2. fits normalization stats over the ranks (``stats-rank<r>.json``: digest);
3. extracts the ``SITES`` of ``texts.parquet`` with the tiny random model (one pass per batch),
   split over the ranks, into ``extract/<site>/``;
4. runs the train stage (``stages.train``) on ``extract/1.mlp/train`` into ``stage/``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import saepipe  # noqa: E402,F401  (fast BLAS before mlx)
from saepipe.activations.config import ExtractConfig  # noqa: E402
from saepipe.activations.normalize import fit_stats  # noqa: E402
from saepipe.lm.sites import Site  # noqa: E402
from saepipe.sae.config import SAEConfig  # noqa: E402

STOP_AT = 5
"""Steps of the ``resume`` run before it is interrupted."""

RUNS = {"cpu": "cpu", "sparse": "sparse", "reference": "reference", "resume": "cpu", "resample": "cpu"}
"""Each run's name and its kernels (``resample``: with dead-latent resampling, see ``run_config``)."""

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "quick", "foxes", "jumped", "over", "lazy", "dogs"]


def data() -> np.ndarray:
    """Activations with structure (a few directions plus noise), an offset and uneven scales."""
    rng = np.random.default_rng(7)
    basis = rng.normal(size=(24, 16))
    codes = rng.exponential(size=(700, 24)) * (rng.random((700, 24)) < 0.15)
    scale = np.linspace(0.5, 2, 16)
    return ((codes @ basis + 0.1 * rng.normal(size=(700, 16)) + 3.0) * scale).astype(np.float32)


def config() -> SAEConfig:
    """Small, and every global part of the step on: AuxK (a low dead threshold), clipping, L1,
    normalization fit during training, a validation split; 129 rows a batch (ranks get 64 and 65)."""
    return SAEConfig(expansion_factor=4, k=4, batch_size=129, num_epochs=2, learning_rate=3e-3,
                     warmup_steps=2, dead_tokens_threshold=129, aux_coef=1 / 32, k_aux=8, gradient_clip=0.5,
                     l1_coefficient=1e-3, validation_split=0.1, seed=3, checkpoint_every=2)


def run_config(name: str) -> SAEConfig:
    """The config of run ``name``: ``config()``, with dead-latent resampling every 2 steps for
    ``resample`` (rank 0 resamples, the other ranks receive its state)."""
    return config().replace(resample_every=2) if name == "resample" else config()


SITES = [Site(1, "mlp"), Site(2, "attn")]
"""The sites extracted over the ranks (both from one forward pass per batch)."""


def extract_config() -> ExtractConfig:
    """Windows of 64 texts (batch 2); the train budget ends inside a window, the eval split is one
    window (so rank 1 extracts nothing there)."""
    return ExtractConfig(context_length=24, batch_size=2, dtype="float32",
                         max_tokens=2500, eval_max_tokens=200, skip_special_tokens=True, shard_rows=256)


def stage_config() -> SAEConfig:
    return SAEConfig(expansion_factor=2, k=4, batch_size=200, num_epochs=1, warmup_steps=1, seed=1,
                     dead_tokens_threshold=200, validation_split=0.1)


def make_inputs(out: Path) -> None:
    """``texts.parquet`` (200 train and 40 eval texts) and ``params.yaml`` for the train stage."""
    import pyarrow as pa  # lazy: only the test's set-up writes parquet
    import pyarrow.parquet as pq  # lazy: as above
    import yaml  # lazy: as above

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(240)]
    pq.write_table(pa.table({"id": pa.array(np.arange(240, dtype=np.int64)), "text": texts,
                             "source": ["test"] * 240, "split": ["train"] * 200 + ["eval"] * 40}),
                   out / "texts.parquet")
    params = {"model": "tiny", "extract": extract_config().to_dict(), "sae": stage_config().to_dict()}
    (out / "params.yaml").write_text(yaml.safe_dump(params))


def save(out: Path, name: str, rank: int, result) -> None:
    np.savez(out / f"{name}-rank{rank}.npz", **{k: np.asarray(v) for k, v in result.sae.parameters().items()})
    (out / f"{name}-rank{rank}.json").write_text(json.dumps({"summary": result.summary, "history": result.history},
                                                            default=str))


def main(out: Path) -> None:
    # lazy: the test imports this module for its data and configs only
    from saepipe.activations.ranked_extract import extract_ranked
    from saepipe.lm.model import tiny_random_model
    from saepipe.parallel.ranks import Ranks
    from saepipe.training.fit import fit_sae
    from stages import train

    ranks = Ranks.world()
    assert ranks.size == 2, f"run me with mlx.launch -n 2 (got {ranks})"
    acts = data()
    for name, kernels in RUNS.items():
        cfg = run_config(name)
        if name == "resume":
            ckpt = out / ("ckpt" if ranks.is_main else "ckpt-rank1-empty")
            fit_sae(acts, cfg, kernels=kernels, ranks=ranks, progress=False, checkpoint_dir=ckpt, max_steps=STOP_AT)
            if ranks.is_main:
                shutil.copytree(ckpt, out / "ckpt-at-stop")
            result = fit_sae(acts, cfg, kernels=kernels, ranks=ranks, progress=False, checkpoint_dir=ckpt)
        else:
            result = fit_sae(acts, cfg, kernels=kernels, ranks=ranks, progress=False)
        save(out, name, ranks.rank, result)

    stats = fit_stats(acts, 100, rows=np.arange(3, 650), ranks=ranks)
    (out / f"stats-rank{ranks.rank}.json").write_text(json.dumps({"digest": stats.digest()}))

    extract_ranked(tiny_random_model(), out / "texts.parquet", out / "extract", extract_config(), SITES, ranks,
                   progress=False)
    train.main(["--params", str(out / "params.yaml"), "--site", "1.mlp", "--acts", str(out / "extract" / "1.mlp" / "train"),
                "--out", str(out / "stage")], standalone_mode=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
