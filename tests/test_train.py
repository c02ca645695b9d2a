"""fit_sae: constraints, schedule, dead counters, determinism, resume, divergence, logging, quality, stage."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import saepipe.training.fit as fit_mod
import saepipe.training.state as state_mod
from saepipe.activations.sources import ArraySource
from saepipe.sae.config import SAEConfig
from saepipe.sae.topk import TopKSAE, load_sae
from saepipe.training.checkpoint import CHECKPOINT_NAME
from saepipe.training.fit import TrainingDivergedError, fit_sae
from saepipe.training.reference import make_reference_step
from saepipe.training.schedule import epoch_order, learning_rate_at, split_rows
from saepipe.training.state import METRICS

SMALL = dict(expansion_factor=4, k=4, batch_size=64, num_epochs=2, warmup_steps=3, learning_rate=3e-3,
             validation_split=0.1, checkpoint_every=0)


def _data(n: int = 700, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=d) + 1.0).astype(np.float32)


def _weights(sae: TopKSAE) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in sae.parameters().items()}


class Recorder:
    def __init__(self, stop_at: int | None = None) -> None:
        self.configs, self.steps, self.epochs, self.stop_at, self.closed = [], [], [], stop_at, False

    def log_config(self, config):
        self.configs.append(config)

    def log_step(self, step, metrics):
        self.steps.append((step, metrics))
        if step == self.stop_at:
            raise KeyboardInterrupt  # a crash right after step `stop_at`

    def log_epoch(self, epoch, step, metrics):
        self.epochs.append((epoch, step, metrics))

    def close(self):
        self.closed = True


# --- pieces -------------------------------------------------------------------------------------
def test_schedule():
    cfg = SAEConfig(learning_rate=1.0, warmup_steps=10, lr_decay="cosine", min_lr_ratio=0.1)
    assert learning_rate_at(0, 100, cfg) == pytest.approx(0.1)
    assert learning_rate_at(9, 100, cfg) == pytest.approx(1.0)
    assert learning_rate_at(10, 100, cfg) == pytest.approx(1.0)
    assert learning_rate_at(55, 100, cfg) == pytest.approx(0.55)
    assert learning_rate_at(99, 100, cfg) == pytest.approx(0.1, abs=1e-3)
    lin = cfg.replace(lr_decay="linear")
    assert learning_rate_at(55, 100, lin) == pytest.approx(0.55)
    assert learning_rate_at(100, 100, lin) == pytest.approx(0.1)
    assert learning_rate_at(80, 100, cfg.replace(lr_decay="constant")) == 1.0
    assert learning_rate_at(0, 100, cfg.replace(warmup_steps=0)) == 1.0


def test_split_and_epoch_order():
    a, b = split_rows(1000, 0.05, seed=3), split_rows(1000, 0.05, seed=3)
    np.testing.assert_array_equal(a.train, b.train)
    assert len(a.val) == 50 and len(a.train) == 950
    assert not set(a.val) & set(a.train)
    assert not np.array_equal(split_rows(1000, 0.05, seed=4).val, a.val)
    assert len(split_rows(10, 0.0, 0).val) == 0
    e0, e1 = epoch_order(a.train, 3, 0), epoch_order(a.train, 3, 1)
    assert sorted(e0) == sorted(a.train) and not np.array_equal(e0, e1)


# --- training invariants -------------------------------------------------------------------------
def test_fit_basic_invariants():
    x = _data()
    rec = Recorder()
    result = fit_sae(x, SAEConfig(**SMALL), logger=rec, progress=False)
    sae = result.sae
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec), axis=1), 1.0, atol=1e-5)
    steps_per_epoch = 630 // 64
    assert result.summary["steps"] == 2 * steps_per_epoch and result.summary["completed"]
    assert [s for s, _ in rec.steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert {"loss", "recon_mse", "fvu", "l0", "dead_fraction", "aux_loss", "learning_rate"} <= set(rec.steps[0][1])
    assert len(rec.configs) == 1 and rec.configs[0]["d_hidden"] == 64 and rec.configs[0]["n_val"] == 70
    assert [(e, s) for e, s, _ in rec.epochs] == [(0, steps_per_epoch), (1, 2 * steps_per_epoch)]
    assert {"val/loss", "val/fvu", "val/l0", "val/dead_fraction"} <= set(rec.epochs[0][2])
    assert rec.closed
    assert len(result.history) == 2 and result.history[1]["val/l0"] <= 4
    # training reduces the loss; exactly k latents (or fewer when a row has < k positive ones)
    assert rec.steps[-1][1]["fvu"] < rec.steps[0][1]["fvu"]
    assert result.summary["initial_loss"] == rec.steps[0][1]["loss"]
    assert result.summary["final_loss"] == rec.steps[-1][1]["loss"]
    assert all(m["l0"] <= 4 for _, m in rec.steps)
    meta = sae.metadata
    assert meta["config"]["k"] == 4 and meta["summary"]["steps"] == result.summary["steps"]
    assert sae.stats is not None and sae.stats.n_rows == 630  # fit on the training rows only


def test_given_stats_are_used_and_normalize_off():
    x = _data(300)
    from saepipe.activations.stats import NormStats

    stats = NormStats(np.zeros(16), np.full(16, 2.0), 1.0, 7)
    cfg = SAEConfig(**{**SMALL, "num_epochs": 1})
    assert fit_sae(x, cfg, stats=stats, progress=False).sae.stats.digest() == stats.digest()
    assert fit_sae(x, cfg.replace(normalize_input=False), stats=stats, progress=False).sae.stats is None
    with pytest.raises(ValueError, match="d_model"):
        fit_sae(x, cfg, stats=NormStats(np.zeros(8), np.ones(8), 1.0, 1), progress=False)


def test_deterministic_given_seed():
    x = _data(400)
    cfg = SAEConfig(**SMALL)
    a = _weights(fit_sae(x, cfg, progress=False).sae)
    b = _weights(fit_sae(x, cfg, progress=False).sae)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    c = _weights(fit_sae(x, cfg.replace(seed=1), progress=False).sae)
    assert not np.array_equal(a["W_dec"], c["W_dec"])


@pytest.mark.parametrize("kernels", ["sparse", "cpu"])
@pytest.mark.parametrize("tied", [False, True])
def test_fast_kernels_match_the_reference(kernels, tied):
    x = _data(800, 16, seed=3)
    # a low threshold: the AuxK variants run too
    cfg = SAEConfig(**{**SMALL, "num_epochs": 1, "dead_tokens_threshold": 64, "tied_weights": tied})
    runs = {kern: Recorder() for kern in (kernels, "reference")}
    res = {kern: fit_sae(x, cfg, logger=rec, max_steps=6, kernels=kern, progress=False)
           for kern, rec in runs.items()}
    assert any(m["aux_loss"] > 0 for _, m in runs["reference"].steps)
    for (_, a), (_, b) in zip(runs[kernels].steps, runs["reference"].steps, strict=True):
        for name in ("loss", "fvu", "aux_loss", "l1_loss", "l0", "grad_norm", "dead_fraction"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    ws, wr = _weights(res[kernels].sae), _weights(res["reference"].sae)
    for name in ws:
        np.testing.assert_allclose(ws[name], wr[name], atol=1e-4)
    with pytest.raises(ValueError, match="kernels"):
        fit_sae(x, cfg, kernels="fast")


def test_tied_weights_training():
    result = fit_sae(_data(400), SAEConfig(**SMALL, tied_weights=True), progress=False)
    assert set(result.sae.parameters()) == {"b_enc", "W_dec", "b_dec"}
    np.testing.assert_allclose(np.linalg.norm(np.asarray(result.sae.W_dec), axis=1), 1.0, atol=1e-5)
    assert math.isfinite(result.summary["val/fvu"])


def test_dead_counter_counts_tokens_since_last_fire():
    """A latent is dead after `dead_tokens_threshold` tokens without firing, not 'in this batch'."""
    d, h, bs = 8, 32, 16
    cfg = SAEConfig(expansion_factor=4, k=4, batch_size=bs, dead_tokens_threshold=int(2.5 * bs))
    step = make_reference_step(cfg, h, 4, with_aux=False)
    params = {k: mx.array(v) for k, v in TopKSAE(d, 4, 4, seed=0).parameters().items()}
    params["b_enc"] = mx.concatenate([mx.full((h - 4,), 5.0), mx.full((4,), -1e6)])  # last 4 never fire
    zeros = {k: mx.zeros_like(v) for k, v in params.items()}
    m, v, t, counter = zeros, dict(zeros), mx.array(0.0), mx.zeros((h,), dtype=mx.int32)
    x = mx.array(_data(bs, d))
    dead = []
    for _ in range(4):
        params, m, v, t, counter, _ = step(params, m, v, t, mx.array(1e-9), x, mx.zeros((d,)),
                                                 mx.ones((d,)), counter, mx.array(0.0))
        dead.append(np.asarray(counter >= cfg.dead_tokens_threshold)[-4:].tolist())
    assert dead[0] == dead[1] == [False] * 4  # 16, then 32 tokens without firing: not yet dead
    assert dead[2] == dead[3] == [True] * 4  # 48 >= 40 tokens
    assert (np.asarray(counter)[: h - 4] == 0).any()  # latents in this batch's top-k reset to 0


def test_auxk_trains_dead_latents_only_when_dead():
    """Dead latents (positive pre-activations, never in the top-k) get gradient only from AuxK."""
    d, h, bs = 8, 32, 16
    cfg = SAEConfig(expansion_factor=4, k=4, batch_size=bs, dead_tokens_threshold=bs, gradient_clip=0.0)
    params = {k: mx.array(v) for k, v in TopKSAE(d, 4, 4, seed=0).parameters().items()}
    params["b_enc"] = mx.concatenate([mx.full((h - 4,), 50.0), mx.full((4,), 5.0)])  # last 4: never top-k
    zeros = {k: mx.zeros_like(v) for k, v in params.items()}
    counter = mx.array([0] * (h - 4) + [bs] * 4, dtype=mx.int32)  # the last 4 are dead
    x = mx.array(_data(bs, d))
    moved = {}
    for with_aux in (False, True):
        step = make_reference_step(cfg, h, 2, with_aux=with_aux)
        new, *_, metrics = step(params, zeros, dict(zeros), mx.array(0.0), mx.array(1e-2), x, mx.zeros((d,)),
                                mx.ones((d,)), counter, mx.array(0.5))
        delta = np.abs(np.asarray(new["W_enc"]) - np.asarray(params["W_enc"]))[-4:].max()
        moved[with_aux] = (delta, float(np.asarray(metrics)[METRICS.index("aux_loss")]))
    assert moved[False] == (0.0, 0.0)
    assert moved[True][0] > 1e-3 and moved[True][1] > 0


# --- resume, divergence ---------------------------------------------------------------------------
def test_resume_reaches_the_same_weights(tmp_path):
    x = _data(600, 16, seed=2)
    # dead latents appear early so the AuxK variant of the step runs across the interruption too
    cfg = SAEConfig(**{**SMALL, "num_epochs": 3, "checkpoint_every": 4, "dead_tokens_threshold": 128})
    full = fit_sae(x, cfg, checkpoint_dir=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit_sae(x, cfg, checkpoint_dir=tmp_path / "b", logger=Recorder(stop_at=14), progress=False)
    info = json.loads(__import__("safetensors").safe_open(
        str(tmp_path / "b" / CHECKPOINT_NAME), "np").metadata()["saepipe_checkpoint"])
    assert info["position"]["step"] == 12  # epoch 1 (8 steps each), last periodic checkpoint
    rec = Recorder()
    resumed = fit_sae(x, cfg, checkpoint_dir=tmp_path / "b", logger=rec, progress=False)
    assert rec.steps[0][0] == 13
    a, b = _weights(full.sae), _weights(resumed.sae)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6)
    assert resumed.history == full.history
    # max_steps stops early with a checkpoint, and the run then finishes the same way
    part = fit_sae(x, cfg, checkpoint_dir=tmp_path / "c", max_steps=5, progress=False)
    assert not part.summary["completed"] and part.summary["steps"] == 5
    done = fit_sae(x, cfg, checkpoint_dir=tmp_path / "c", progress=False)
    for name, value in _weights(done.sae).items():
        np.testing.assert_allclose(value, a[name], rtol=0, atol=1e-6)


def test_checkpoint_from_another_config_is_not_resumed(tmp_path):
    x = _data(300)
    cfg = SAEConfig(**{**SMALL, "num_epochs": 1})
    fit_sae(x, cfg, checkpoint_dir=tmp_path, progress=False)
    rec = Recorder()
    fit_sae(x, cfg.replace(k=3), checkpoint_dir=tmp_path, logger=rec, progress=False)
    assert rec.steps[0][0] == 1


def test_divergence_stops_with_step_and_metric(tmp_path):
    cfg = SAEConfig(**{**SMALL, "learning_rate": 1e25, "warmup_steps": 0, "gradient_clip": 0.0,
                       "checkpoint_every": 1, "normalize_input": False})
    with pytest.raises(TrainingDivergedError, match=r"step (\d+): .*loss") as err:
        fit_sae(_data(), cfg, checkpoint_dir=tmp_path, progress=False)
    step = int(err.value.args[0].split("step ")[1].split(":")[0])
    assert step >= 2 and str(tmp_path) in str(err.value)
    from safetensors.numpy import load_file

    kept = load_file(str(tmp_path / CHECKPOINT_NAME))
    assert all(np.isfinite(v).all() for v in kept.values())


def test_nan_input_is_reported():
    x = _data(200)
    x[:] = np.nan
    with pytest.raises(ValueError, match=r"activations hold NaN or inf in 200 of 200 rows"):  # not "diverged"
        fit_sae(x, SAEConfig(**{**SMALL, "normalize_input": False}), progress=False)


# --- data access, logging ------------------------------------------------------------------------
class CountingSource(ArraySource):
    def __init__(self, data):
        super().__init__(data)
        self.sizes: list[int] = []

    def take(self, rows):
        assert np.all(np.diff(rows) > 0), "rows must be fetched in sorted order"
        self.sizes.append(len(rows))
        return super().take(rows)

    def chunks(self, chunk_rows):
        raise AssertionError("training reads rows with take() only")


def test_rows_are_read_in_bounded_sorted_batches(monkeypatch):
    monkeypatch.setattr(fit_mod, "_READ_ROWS", 100)
    monkeypatch.setattr(state_mod, "GEOMETRIC_MEDIAN_ROWS", 100)
    src = CountingSource(_data(1000))
    fit_sae(src, SAEConfig(**{**SMALL, "num_epochs": 1}), progress=False)
    assert max(src.sizes) <= 100 and sum(src.sizes) >= 1000


def test_use_wandb_without_wandb_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="wandb"):
        fit_sae(_data(200), SAEConfig(**SMALL, use_wandb=True), progress=False)


def test_wandb_names_and_config(monkeypatch):
    import sys
    import types

    calls: dict = {"log": [], "config": {}}

    class Run:
        config = types.SimpleNamespace(update=lambda c, allow_val_change=False: calls["config"].update(c))

        def log(self, metrics, step):
            calls["log"].append((step, metrics))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = SAEConfig(**SMALL, use_wandb=True, wandb_project="p", wandb_name="n", wandb_tags=("a",))
    fit_sae(_data(300), cfg, metadata={"layer": 2, "component": "mlp"}, progress=False, log_every=1)
    assert calls["init"] == {"project": "p", "name": "n", "tags": ["a"]} and calls["finished"]
    assert calls["config"]["layer"] == 2 and calls["config"]["d_hidden"] == 64 and calls["config"]["k"] == 4
    keys = set().union(*(m.keys() for _, m in calls["log"]))
    assert {"train/loss", "train/recon_loss", "train/l0", "train/dead_fraction", "train/l1_loss",
            "train/learning_rate", "val/loss", "val/l0", "val/dead_fraction"} <= keys


# --- planted dictionary ---------------------------------------------------------------------------
def _planted(d: int, n_atoms: int, n_rows: int, seed: int = 0, active: float = 4.0, noise: float = 0.01):
    """Rows = sparse non-negative codes (Zipf-like atom frequencies) x unit atoms + small noise."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    freq = 1.0 / np.arange(1, n_atoms + 1) ** 0.5
    freq = np.minimum(freq / freq.sum() * active, 0.9)
    codes = (rng.random((n_rows, n_atoms)) < freq) * rng.uniform(0.5, 2.0, size=(n_rows, n_atoms))
    x = codes @ atoms + noise * rng.normal(size=(n_rows, d))
    return x.astype(np.float32), atoms


def _recovery(sae: TopKSAE, atoms: np.ndarray) -> float:
    """Mean over atoms of the best cosine to any decoder row."""
    w = np.asarray(sae.W_dec)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    return float((atoms @ w.T).max(axis=1).mean())


PLANTED = dict(k=6, batch_size=256, num_epochs=10, warmup_steps=20, learning_rate=1e-2, normalize_input=False,
               dead_tokens_threshold=2000, checkpoint_every=0, validation_split=0.05)


@pytest.fixture
def single_thread_blas():
    """Small matmuls: one OpenBLAS thread is as fast, and far faster when the cores are shared."""
    from saepipe.runtime.blas_threads import single_threaded

    with single_threaded():
        yield


def test_planted_dictionary_overcomplete_sae_recovers_atoms(single_thread_blas):
    x, atoms = _planted(32, 96, 20000)
    result = fit_sae(x, SAEConfig(expansion_factor=12, **PLANTED), progress=False)
    rec = _recovery(result.sae, atoms)
    print(f"\nplanted d=32 atoms=96 d_hidden=384: recovery {rec:.4f}, val FVU {result.summary['val/fvu']:.4f}, "
          f"dead {result.summary['dead_fraction']:.3f}")
    assert rec >= 0.95


def test_planted_dictionary_exact_width_keeps_latents_alive(single_thread_blas):
    x, atoms = _planted(32, 64, 20000, seed=1)
    result = fit_sae(x, SAEConfig(expansion_factor=2, **PLANTED), progress=False)
    rec = _recovery(result.sae, atoms)
    dead = result.summary["dead_fraction"]
    print(f"\nplanted d=32 atoms=64 d_hidden=64: recovery {rec:.4f}, val FVU {result.summary['val/fvu']:.4f}, "
          f"dead {dead:.3f}")
    assert dead <= 0.05 and rec >= 0.9


# --- stage ----------------------------------------------------------------------------------------
def _shard_folder(path, data: np.ndarray, layer: int, component: str) -> None:
    from saepipe.activations.shards import SHARD_PATTERN, write_manifest, write_shard

    path.mkdir(parents=True)
    shards = []
    for i, start in enumerate(range(0, len(data), 256)):
        part = data[start : start + 256]
        n = len(part)
        shards.append(write_shard(path / SHARD_PATTERN.format(i), part, np.zeros(n), np.zeros(n),
                                  np.arange(n), "float32")._asdict())
    write_manifest(path, {"d_model": data.shape[1], "n_tokens": len(data), "layer": layer, "component": component,
                          "site": f"model.model.layers.{layer}.{component}", "model_id": "tiny",
                          "model_hash": "hash123", "split": "train", "shards": shards})


def test_stage_cli(tmp_path):
    from stages.train import main

    acts = tmp_path / "acts"
    _shard_folder(acts, _data(600), layer=1, component="mlp")
    params = {"model": "tiny", "sae": {**SMALL, "checkpoint_every": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "train"
    args = ["--params", str(tmp_path / "params.yaml"), "--acts", str(acts), "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    sae = load_sae(out / "sae.safetensors")
    meta = sae.metadata
    assert (meta["layer"], meta["component"], meta["model_hash"]) == (1, "mlp", "hash123")
    assert meta["activations_digest"] and meta["config"]["k"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 * (540 // 64) and len(metrics["history"]) == 2
    assert (out / "live" / "plots" / "metrics" / "loss.tsv").exists()
    assert (out / "live" / "plots" / "metrics" / "val" / "fvu.tsv").exists()
    assert not (out / "checkpoints").exists()
    # a site mismatch between --site and the shards is refused
    res = CliRunner().invoke(main, [*args, "--site", "2.mlp"])
    assert res.exit_code != 0 and "extracted at 1.mlp but --site is 2.mlp" in res.output


def test_stage_cli_trains_a_sweep_variant(tmp_path):
    """--variant NAME: the sae: section with sweep.variants.NAME on top."""
    from stages.train import main

    acts = tmp_path / "acts"
    _shard_folder(acts, _data(600), layer=1, component="mlp")
    params = {"model": "tiny", "sae": {**SMALL, "num_epochs": 1},
              "sweep": {"sites": ["1.mlp"], "variants": {"default": {}, "k2": {"k": 2}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    base = ["--params", str(tmp_path / "params.yaml"), "--acts", str(acts), "--site", "1.mlp"]
    res = CliRunner().invoke(main, [*base, "--variant", "k2", "--out", str(tmp_path / "k2")])
    assert res.exit_code == 0, res.output
    assert load_sae(tmp_path / "k2" / "sae.safetensors").k == 2
    assert load_sae(tmp_path / "k2" / "sae.safetensors").metadata["config"]["num_epochs"] == 1
    bad = CliRunner().invoke(main, [*base, "--variant", "k3", "--out", str(tmp_path / "k3")])
    assert bad.exit_code != 0 and "no variant 'k3' in sweep.variants (have: default, k2)" in bad.output


def test_metrics_json_nulls_non_finite_and_unwraps_scalars(tmp_path):
    import json

    from saepipe.runtime.files import write_metrics_json

    path = write_metrics_json(tmp_path / "m.json", {"a": float("nan"), "b": [np.float32(1.5), float("inf")],
                                                    "c": {"d": np.int64(3), "e": mx.array(2.0)}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": 3, "e": 2.0}}
