"""The GPU path, checked without a GPU: with MLX's default device reported as a GPU (mocked), every
device choice takes its GPU branch (training kernels, forward pass, model dtype policy) and nothing
forces the CPU (no per-core CPU streams, no CPU-only formulations); the computations themselves
still run on this machine's CPU, so the results can be compared with the CPU path.

On a machine with an NVIDIA GPU, ``benchmarks/gpu.sh`` installs MLX's CUDA backend and runs the
real thing.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from saepipe.cli import main as cli
from saepipe.evaluation.evaluate import evaluate_sae
from saepipe.lm import forward as fw
from saepipe.lm import model as lm_model
from saepipe.lm.sites import Site
from saepipe.sae.config import SAEConfig
from saepipe.sae.topk import TopKSAE
from saepipe.training import cpu_step, fit
from saepipe.training.steps import CompiledStepRunner, resolve_kernels

GPU = mx.Device(mx.gpu, 0)


@pytest.fixture
def on_gpu(monkeypatch):
    """MLX's default device reported as a GPU (the arrays still live on the CPU)."""
    monkeypatch.setattr(mx, "default_device", lambda: GPU)


def _forbid(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} ran on the GPU path")
    monkeypatch.setattr(module, name, fail)


def test_auto_kernels_are_the_mlx_step_on_a_gpu(on_gpu):
    assert not cpu_step.available()
    assert resolve_kernels("auto") == "sparse"
    assert resolve_kernels("cpu") == "cpu"  # asked for by name, still honoured


def test_auto_kernels_are_the_cpu_step_on_a_cpu():
    assert mx.default_device() == mx.cpu
    assert resolve_kernels("auto") == "cpu"


def test_fit_sae_runs_the_mlx_step_on_a_gpu(on_gpu, monkeypatch):
    """``fit_sae(kernels="auto")`` builds the compiled MLX step (never the numba CPU step)."""
    made = []
    real = fit.make_runner

    def spy(*args, **kwargs):
        runner = real(*args, **kwargs)
        made.append(runner)
        return runner

    monkeypatch.setattr(fit, "make_runner", spy)
    _forbid(monkeypatch, cpu_step, "CpuStep")
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    result = fit.fit_sae(x, SAEConfig(expansion_factor=2, k=3, batch_size=64, num_epochs=1, warmup_steps=1),
                         progress=False)
    assert [type(r) for r in made] == [CompiledStepRunner] and made[0].kernels == "sparse"
    assert result.summary["steps"] == 4


def test_forward_on_a_gpu_uses_no_cpu_streams_and_the_library_attention(tiny_model, monkeypatch):
    """The same activations and logits as the CPU path, without per-core CPU streams, the fast CPU
    exp or the hand-written attention."""
    tokens = mx.array(np.random.default_rng(1).integers(0, 250, size=(4, 12)), dtype=mx.int32)
    site = Site(1, "mlp")
    want = fw.forward(tiny_model.model, tokens, capture=[site])
    want_logits, want_acts = np.array(want.logits), np.array(want.activations[site])
    monkeypatch.setattr(mx, "default_device", lambda: GPU)
    for name in ("_cpu_streams", "_causal_softmax", "_swiglu"):
        _forbid(monkeypatch, fw, name)
    assert fw._parallel_parts(8) == 1
    got = fw.forward(tiny_model.model, tokens, capture=[site])
    np.testing.assert_allclose(np.array(got.activations[site]), want_acts, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(got.logits), want_logits, rtol=1e-4, atol=1e-4)


def test_evaluate_runs_on_the_gpu_path(tiny_model, on_gpu, monkeypatch):
    for name in ("_cpu_streams", "_causal_softmax", "_swiglu"):
        _forbid(monkeypatch, fw, name)
    sae = TopKSAE(tiny_model.info.d_model, 2, 4)
    result = evaluate_sae(tiny_model, sae, ["The quick brown fox.", "Sparse autoencoders find features."],
                          layer=1, component="mlp", max_tokens=100, batch_size=2, context_length=16,
                          skip_special_tokens=True)
    assert np.isfinite(result.to_dict()["fvu"])


def test_models_keep_their_quantization_on_a_gpu(on_gpu, monkeypatch):
    """The dtype policy: stored quantization is kept where MLX runs on a GPU (float32 on a CPU)."""
    seen = []
    monkeypatch.setattr(lm_model, "_load_gguf", lambda path, model_id, dequantize: seen.append(dequantize))
    monkeypatch.setattr(lm_model, "default_gguf_path", lambda: "x.gguf")
    assert lm_model.gpu_is_default()
    lm_model.load_model("default")
    monkeypatch.undo()
    assert seen == [False]


def test_info_reports_the_gpu_choice(on_gpu):
    out = CliRunner().invoke(cli, ["info"])
    assert out.exit_code == 0, out.output
    assert "MLX device: Device(gpu, 0)" in out.output and "auto -> sparse" in out.output
