"""Dead-latent resampling (``SAEConfig.resample_every``): the recipe on a state, revival on data built
to kill latents, agreement of the step kernels, exact resume, config checks and logging."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from saepipe.sae.config import SAEConfig
from saepipe.training import resample as rs
from saepipe.training.fit import fit_sae
from saepipe.training.state import TrainState, counter_cap
from tests.test_train import SMALL, Recorder, _data, _planted, _weights


def _state(d=8, h=32, seed=0, tied=False) -> TrainState:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(h, d)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    params = {"W_dec": w, "b_enc": rng.normal(size=h).astype(np.float32) * 0.1,
              "b_dec": rng.normal(size=d).astype(np.float32) * 0.1}
    if not tied:
        params["W_enc"] = (w * rng.uniform(0.5, 2.0, size=(h, 1))).astype(np.float32)

    def moments():
        return {k: mx.array(rng.uniform(0.1, 1.0, size=v.shape).astype(np.float32)) for k, v in params.items()}

    counter = np.arange(h, dtype=np.int32) * 10  # latents 20.. have not fired for >= 200 tokens
    return TrainState({k: mx.array(v) for k, v in params.items()}, moments(), moments(), mx.array(7.0),
                      mx.array(counter))


@pytest.mark.parametrize("tied", [False, True])
def test_resample_recipe_on_a_state(tied):
    cfg = SAEConfig(expansion_factor=4, k=3, resample_every=5, resample_window=200, resample_scale=0.2,
                    tied_weights=tied)
    state = _state(tied=tied)
    x = _data(300, 8, seed=1)
    new, latents = rs.resample(state, x, cfg, step=5)
    dead = np.arange(20, 32)
    assert latents.tolist() == dead.tolist()
    old = {k: np.asarray(v) for k, v in state.params.items()}
    p = {k: np.asarray(v) for k, v in new.params.items()}
    alive = np.arange(20)
    # decoder rows of the dead: unit residual directions of rows of x (drawn by reconstruction error)
    e = rs.residuals(state.params, x, cfg.k, tied)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"][dead], axis=1), 1.0, rtol=1e-5)
    best = (p["W_dec"][dead] @ unit.T).max(axis=1)
    np.testing.assert_allclose(best, 1.0, rtol=1e-5)
    if not tied:
        mean_alive = np.linalg.norm(old["W_enc"][alive], axis=1).mean()
        np.testing.assert_allclose(np.linalg.norm(p["W_enc"][dead], axis=1), 0.2 * mean_alive, rtol=1e-5)
        np.testing.assert_allclose(p["W_enc"][dead] / (0.2 * mean_alive), p["W_dec"][dead], rtol=1e-4, atol=1e-6)
    assert (p["b_enc"][dead] == 0).all()
    # everything else untouched; Adam moments of the resampled rows zeroed, others kept; counters restart
    for name in p:
        np.testing.assert_array_equal(p[name][alive] if name != "b_dec" else p[name],
                                      old[name][alive] if name != "b_dec" else old[name])
    for group_new, group_old in ((new.m, state.m), (new.v, state.v)):
        for name in group_new:
            a, b = np.asarray(group_new[name]), np.asarray(group_old[name])
            if name == "b_dec":
                np.testing.assert_array_equal(a, b)
            else:
                assert (a[dead] == 0).all()
                np.testing.assert_array_equal(a[alive], b[alive])
    assert np.asarray(new.counter)[dead].tolist() == [0] * len(dead)
    np.testing.assert_array_equal(np.asarray(new.counter)[alive], np.asarray(state.counter)[alive])
    assert float(new.t) == 7.0
    # deterministic in (seed, step); the input state is not modified
    again, _ = rs.resample(state, x, cfg, step=5)
    np.testing.assert_array_equal(np.asarray(again.params["W_dec"]), p["W_dec"])
    other, _ = rs.resample(state, x, cfg, step=10)
    assert not np.array_equal(np.asarray(other.params["W_dec"]), p["W_dec"])
    np.testing.assert_array_equal(np.asarray(state.params["W_dec"]), old["W_dec"])


def test_nothing_dead_nothing_changes():
    cfg = SAEConfig(expansion_factor=4, k=3, resample_every=5, resample_window=10_000)
    state = _state()
    new, latents = rs.resample(state, _data(50, 8), cfg, step=5)
    assert latents.size == 0 and new is state


def test_when_and_window():
    cfg = SAEConfig(resample_every=10, dead_tokens_threshold=500)
    assert [s for s in range(1, 41) if rs.due(s, cfg, total_steps=40)] == [10, 20, 30]  # never after the last step
    assert rs.window(cfg) == 500 == counter_cap(cfg)
    longer = cfg.replace(resample_window=2000)
    assert rs.window(longer) == 2000 == counter_cap(longer)  # the counters must count that far
    assert counter_cap(longer.replace(resample_every=0)) == 500
    assert not any(rs.due(s, SAEConfig(), 100) for s in range(1, 101))


def test_config_checks():
    for bad, match in ((dict(resample_every=-1), "resample_every"), (dict(resample_every=1.5), "resample_every"),
                       (dict(resample_window=0), "resample_window"), (dict(resample_scale=0.0), "resample_scale"),
                       (dict(resample_scale=float("inf")), "resample_scale")):
        with pytest.raises(ValueError, match=match):
            SAEConfig(**bad)
    assert SAEConfig.from_dict({"resample_every": 100, "resample_window": 4096}).resample_every == 100


# --- in training ------------------------------------------------------------------------------------
KILL = dict(expansion_factor=4, k=4, batch_size=128, num_epochs=4, warmup_steps=5, learning_rate=5e-2,
            normalize_input=False, dead_tokens_threshold=1000, checkpoint_every=0, validation_split=0.05,
            aux_coef=0.0)
"""A high learning rate and no AuxK: plain training leaves ~45 % of the latents dead on this data."""


def test_resampling_revives_latents_killed_by_plain_training():
    x, atoms = _planted(32, 128, 8000)
    rec = Recorder()
    plain = fit_sae(x, SAEConfig(**KILL), progress=False)
    resampled = fit_sae(x, SAEConfig(**KILL, resample_every=25), logger=rec, progress=False)

    def recovery(sae):
        w = np.asarray(sae.W_dec)
        return float((atoms @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(axis=1).mean())

    a, b = plain.summary, resampled.summary
    print(f"\nplain: dead {a['dead_fraction']:.3f} FVU {a['val/fvu']:.4f} recovery {recovery(plain.sae):.3f}; "
          f"resampling: dead {b['dead_fraction']:.3f} FVU {b['val/fvu']:.4f} recovery {recovery(resampled.sae):.3f}, "
          f"{b['resampled_latents']} resampled")
    assert a["dead_fraction"] > 0.3  # the data kills latents
    assert b["dead_fraction"] < a["dead_fraction"] / 3
    assert b["val/fvu"] < a["val/fvu"] and recovery(resampled.sae) > recovery(plain.sae)
    assert all(np.isfinite(m["loss"]) for _, m in rec.steps)
    events = [(s, m["resampled"]) for s, m in rec.steps if "resampled" in m]
    assert [s for s, _ in events] == list(range(25, 240, 25)) and sum(n for _, n in events) == b["resampled_latents"] > 0
    assert "resampled_latents" not in a


@pytest.mark.parametrize("kernels", ["cpu", "sparse"])
def test_step_kernels_agree_with_the_reference_with_resampling(kernels):
    x = _data(800, 16, seed=3)
    cfg = SAEConfig(**{**SMALL, "num_epochs": 1, "dead_tokens_threshold": 64, "resample_every": 2,
                       "resample_window": 128})
    runs = {kern: Recorder() for kern in (kernels, "reference")}
    res = {kern: fit_sae(x, cfg, logger=rec, max_steps=8, kernels=kern, progress=False) for kern, rec in runs.items()}
    counts = [m.get("resampled") for _, m in runs["reference"].steps]
    assert sum(c or 0 for c in counts) > 0  # latents were resampled during the comparison
    assert counts == [m.get("resampled") for _, m in runs[kernels].steps]
    for (_, a), (_, b) in zip(runs[kernels].steps, runs["reference"].steps, strict=True):
        for name in ("loss", "fvu", "aux_loss", "l0", "grad_norm", "dead_fraction"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    ws, wr = _weights(res[kernels].sae), _weights(res["reference"].sae)
    for name in ws:
        np.testing.assert_allclose(ws[name], wr[name], atol=1e-4)


def test_resume_with_resampling_is_exact(tmp_path):
    x = _data(600, 16, seed=2)
    cfg = SAEConfig(**{**SMALL, "num_epochs": 3, "checkpoint_every": 4, "dead_tokens_threshold": 64,
                       "resample_every": 3, "resample_window": 64})
    full_rec = Recorder()
    full = fit_sae(x, cfg, checkpoint_dir=tmp_path / "a", logger=full_rec, progress=False)
    assert full.summary["resampled_latents"] > 0
    with pytest.raises(KeyboardInterrupt):  # after step 14: resumes from step 12 (a resampling step)
        fit_sae(x, cfg, checkpoint_dir=tmp_path / "b", logger=Recorder(stop_at=14), progress=False)
    rec = Recorder()
    resumed = fit_sae(x, cfg, checkpoint_dir=tmp_path / "b", logger=rec, progress=False)
    assert rec.steps[0][0] == 13
    for name, value in _weights(full.sae).items():
        np.testing.assert_allclose(_weights(resumed.sae)[name], value, rtol=0, atol=1e-6)
    assert resumed.summary["resampled_latents"] == full.summary["resampled_latents"]
    assert [m.get("resampled") for _, m in rec.steps] == [m.get("resampled") for _, m in full_rec.steps[12:]]


def test_resampled_count_is_a_dvclive_metric_at_every_resampling(tmp_path):
    x = _data(800, 16, seed=3)
    cfg = SAEConfig(**{**SMALL, "num_epochs": 1, "dead_tokens_threshold": 64, "resample_every": 3})
    result = fit_sae(x, cfg, live_dir=tmp_path / "live", log_every=10, progress=False)
    rows = (tmp_path / "live" / "plots" / "metrics" / "resampled.tsv").read_text().split()
    assert rows[0] == "step" and rows[1] == "resampled"
    steps, counts = [int(s) for s in rows[2::2]], [float(c) for c in rows[3::2]]
    assert steps == [3, 6, 9]  # logged although log_every is 10 (11 steps: none after the last one)
    assert sum(counts) == result.summary["resampled_latents"] > 0
