"""Data-parallel training and split extraction on 2 ranks (``mlx.launch --backend ring`` on 127.0.0.1)
against one process: same weights, same stats, same rows, resume across ranks.

One launch (``tests/distributed_fit.py``) does all the 2-rank work; the tests compare its outputs
with the same work done here in one process.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from saepipe.activations.extract import extract
from saepipe.activations.normalize import fit_stats
from saepipe.activations.ranked_extract import RANK_FOLDER, merged_manifest, plan_ranks
from saepipe.activations.shards import ShardSource
from saepipe.lm.model import tiny_random_model
from saepipe.parallel.ranks import Ranks
from saepipe.training.fit import fit_sae
from tests import distributed_fit as job

SCRIPT = Path(job.__file__)
ATOL = 2e-5
"""Weights of 2 ranks vs one process: float32 sums in another order, over 8 Adam steps."""


def _launcher() -> str | None:
    found = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    return found if Path(found).exists() else None


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The outputs of one 2-rank launch of ``tests/distributed_fit.py``."""
    launcher = _launcher()
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    out = tmp_path_factory.mktemp("ranks")
    job.make_inputs(out)
    # One thread per rank (2 ranks share the machine), and a port of our own: several test runs may
    # share a host. The ranks may cache bytecode: each imports MLX, numba and mlx-lm afresh, which
    # compiled from source costs more than all the training (measured: 54 s vs 14 s of imports).
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    port = random.Random(os.getpid() ^ time.time_ns()).randrange(20000, 60000, 2)
    cmd = [launcher, "-n", "2", "--backend", "ring", "--starting-port", str(port), "--",
           sys.executable, str(SCRIPT), str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"2-rank launch failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    print(f"2-rank launch: {time.perf_counter() - started:.1f}s")
    return out


def _weights(result) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in result.sae.parameters().items()}


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The runs of ``job.RUNS`` in this process (one rank)."""
    acts = job.data()
    runs = {}
    for name, kernels in job.RUNS.items():
        if name == "resume":
            continue  # an uninterrupted run reaches the same weights (tests/test_train.py): compare with "cpu"
        runs[name] = fit_sae(acts, job.run_config(name), kernels=kernels, ranks=Ranks(), progress=False)
    return runs


@pytest.mark.parametrize("name", list(job.RUNS))
def test_two_ranks_reach_the_weights_of_one_process(launched, one_process, name):
    """Each kernel (and the interrupted-and-resumed run) on 2 ranks: every rank holds the same weights,
    the one-process weights within float tolerance; the metrics agree too."""
    ref = one_process["cpu" if name == "resume" else name]
    rank0, rank1 = (np.load(launched / f"{name}-rank{r}.npz") for r in (0, 1))
    for key, want in _weights(ref).items():
        assert np.array_equal(rank0[key], rank1[key]), f"{name}: ranks differ in {key}"
        np.testing.assert_allclose(rank0[key], want, atol=ATOL, rtol=0, err_msg=f"{name}: {key}")
    summary = json.loads((launched / f"{name}-rank0.json").read_text())["summary"]
    assert summary["steps"] == ref.summary["steps"] == 8
    for metric in ("final_loss", "val/fvu", "train/aux_loss", "train/l1_loss", "train/grad_norm", "dead_fraction"):
        assert summary[metric] == pytest.approx(ref.summary[metric], rel=1e-4, abs=1e-6), metric
    assert ref.summary["train/aux_loss"] > 0  # AuxK ran: its global variance was exercised
    if name == "resample":  # rank 0 resampled the same latents; rank 1 took its state
        assert summary["resampled_latents"] == ref.summary["resampled_latents"] > 0


def test_rank1_reads_rank0s_checkpoint(launched):
    """Rank 1 had an empty checkpoint folder of its own: it resumed from rank 0's state (broadcast)
    and never wrote one."""
    assert (launched / "ckpt" / "checkpoint.safetensors").is_file()
    assert not (launched / "ckpt-rank1-empty").exists()


def test_a_two_rank_checkpoint_resumes_in_one_process(launched, one_process, tmp_path):
    """The checkpoint 2 ranks wrote at step 5 resumes in one process and ends at the uninterrupted weights."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(launched / "ckpt-at-stop", ckpt)
    result = fit_sae(job.data(), job.config(), kernels="cpu", ranks=Ranks(), progress=False, checkpoint_dir=ckpt)
    assert result.summary["steps"] == 8
    for key, want in _weights(one_process["cpu"]).items():
        np.testing.assert_allclose(_weights(result)[key], want, atol=ATOL, rtol=0, err_msg=key)


def test_stats_over_ranks_are_one_process_stats(launched):
    """Normalization stats fit over 2 ranks: the same bits on both ranks and as one process."""
    want = fit_stats(job.data(), 100, rows=np.arange(3, 650)).digest()
    for r in (0, 1):
        assert json.loads((launched / f"stats-rank{r}.json").read_text())["digest"] == want


def test_extraction_over_ranks_stores_the_rows_of_one_process(launched, tmp_path):
    """Both splits of both sites: the same rows (values, tokens, texts, positions) in the same order
    as one process, one manifest per site over the ranks' folders; the eval split fits in one window
    (rank 1 idle)."""
    cfg = job.extract_config()
    one = extract(tiny_random_model(), launched / "texts.parquet", tmp_path / "one", cfg, job.SITES, progress=False)
    for site, split in itertools.product(job.SITES, ("train", "eval")):
        two = ShardSource(launched / "extract" / site.id / split, verify=True)
        ref = ShardSource(tmp_path / "one" / site.id / split)
        assert two.n_rows == ref.n_rows == one[site][split]["n_tokens"] == cfg.max_rows(split)
        np.testing.assert_allclose(two.take(np.arange(two.n_rows)), ref.take(np.arange(ref.n_rows)), atol=1e-5)
        for column in ("token_id", "doc_id", "position"):
            assert np.array_equal(two.column(column), ref.column(column)), (site, split, column)
        assert two.manifest["fingerprint"] == one[site][split]["fingerprint"]
        assert (two.manifest["layer"], two.manifest["component"]) == site
        folders = {entry["file"].split("/")[0] for entry in two.manifest["shards"]}
        assert folders == ({RANK_FOLDER.format(0), RANK_FOLDER.format(1)} if split == "train"
                           else {RANK_FOLDER.format(0)})
    passes = json.loads((launched / "extract" / "extract.json").read_text())
    assert passes["train"]["sites_run"] == ["1.mlp", "2.attn"] and passes["train"]["ranks"] == 2
    # one process accepts the 2-rank folders as complete (same fingerprint and budget): nothing rewritten
    again = extract(tiny_random_model(), launched / "texts.parquet", launched / "extract", cfg, job.SITES,
                    progress=False)
    assert again[job.SITES[0]]["train"]["ranks"] == 2 and again[job.SITES[1]]["eval"]["ranks"] == 2


def test_train_stage_under_mlx_launch(launched):
    """``stages.train`` on 2 ranks: rank 0 wrote the SAE and metrics, and removed its checkpoint;
    the SAE equals one process's fit on the same rows."""
    from saepipe.sae.topk import TopKSAE  # lazy: only this test loads an SAE file

    stage = launched / "stage"
    assert (stage / "sae.safetensors").is_file() and (stage / "metrics.json").is_file()
    assert not (stage / "checkpoints" / "checkpoint.safetensors").exists()
    sae = TopKSAE.load(stage / "sae.safetensors")
    want = fit_sae(launched / "extract" / "1.mlp" / "train", job.stage_config(), ranks=Ranks(), progress=False)
    for key, value in _weights(want).items():
        np.testing.assert_allclose(np.asarray(sae.parameters()[key]), value, atol=ATOL, rtol=0, err_msg=key)
    assert sae.metadata["layer"] == 1 and sae.metadata["component"] == "mlp"


# --------------------------------------------------------------------------------------------------
# The pieces, in one process
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 129])
def test_rank_parts_cover_the_items_in_order(n):
    ranks = [Ranks() for _ in range(3)]
    for r, obj in enumerate(ranks):
        obj.size, obj.rank = 3, r  # the arithmetic of a 3-rank group (no group needed)
    parts = [obj.bounds(n) for obj in ranks]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    assert max(s - f for f, s in parts) - min(s - f for f, s in parts) <= 1


def test_a_single_process_rank_is_the_identity():
    ranks = Ranks()
    assert (ranks.size, ranks.rank, ranks.is_main, ranks.distributed) == (1, 0, True, False)
    x = np.arange(5.0)
    assert ranks.part(x) is x
    assert ranks.sum64(1.5, x)[1].tolist() == x.tolist()
    assert ranks.gather_bytes(b"ab") == [b"ab"] and ranks.broadcast_bytes(b"ab") == b"ab"


def test_a_plain_process_is_one_rank_without_asking_mlx(monkeypatch):
    """No launcher variables: one rank, and MLX's init (which may start an MPI singleton) never runs."""
    import mlx.core as mx  # lazy: only this test patches MLX

    from saepipe.parallel import ranks as ranks_module  # lazy: as above

    for name in ranks_module.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def fail(*args, **kwargs):
        raise AssertionError("mx.distributed.init called in a plain process")

    monkeypatch.setattr(mx.distributed, "init", fail)
    world = Ranks.world()
    assert (world.size, world.rank, world.group) == (1, 0, None)


def test_plan_ranks_splits_windows_by_rows():
    rows = np.array([10, 30, 20, 40, 5])
    # 100 rows wanted: windows 0-3 (the 4th only in part: 100 - 60 = 40 of its 40 rows)
    plan = plan_ranks(rows, 100, 2)
    assert plan[0][0] == 0 and plan[-1][1] == 4 and sum(q for _, _, q in plan) == 100
    assert plan == [(0, 2, 40), (2, 4, 60)]
    assert plan_ranks(rows, 35, 2) == [(0, 1, 10), (1, 2, 25)]
    assert sum(q for _, _, q in plan_ranks(rows, 10_000, 3)) == rows.sum()
    assert plan_ranks(rows[:1], 5, 2) == [(0, 1, 5), (1, 1, 0)]  # one window: rank 1 idle


def test_merged_manifest_names_rank_folders():
    part = {"n_tokens": 3, "shards": [{"file": "shard-00000.arrow", "rows": 3, "sha256": "x"}], "digest": "d",
            "fingerprint": {"texts_digest": "sub"}, "texts_digest": "sub", "max_rows": 3, "d_model": 4}
    merged = merged_manifest([part, None, {**part, "n_tokens": 2}], {"texts_digest": "all"}, 9)
    assert [s["file"] for s in merged["shards"]] == ["rank-00/shard-00000.arrow", "rank-02/shard-00000.arrow"]
    assert (merged["n_tokens"], merged["max_rows"], merged["ranks"], merged["texts_digest"]) == (5, 9, 3, "all")
    assert "digest" not in merged
