"""Faults against the real pipeline (``dvc repro`` on a tiny project, see tests/fault_project.py) and
against every writer: a SIGKILL in any stage, killing only ``dvc``, a full disk.

The DVC runs take minutes on a small machine (each stage is a fresh interpreter), so they are marked
``slow``; the disk-full tests are quick.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saepipe.training.fit import TIMINGS
from tests.fault_project import ROOT, dvc, env, make_project

SITE, VARIANT = "1.mlp", "default"  # the tiny project's one run (sweep.sites x sweep.variants)
RUN = f"{SITE}/{VARIANT}"  # its folder under data/<stage>/
DVC_NAMES = {"normalize": f"normalize@{SITE}", "train": f"train@{SITE}-{VARIANT}",
             "evaluate": f"evaluate@{SITE}-{VARIANT}"}  # the matrix stages as DVC names them

KILLS = [  # (stage, fault): SIGKILL in the middle of each stage's work
    ("prepare", "saepipe.runtime.files:file_sha256:1:before"),  # texts.parquet written, counts.json not
    ("extract", "saepipe.activations.shards:write_shard:3:after"),  # 3 of 6 train shards written, 2 recorded
    ("normalize", "saepipe.activations.stats:write_safetensors:1:after"),  # stats written, stats.json not
    ("train", "saepipe.training.checkpoint:save_checkpoint:3:after"),  # step 30 of 168
    ("evaluate", "saepipe.evaluation.plots:write_html_report:1:before"),  # metrics and plots written
]


def outputs(project: Path) -> dict[str, bytes]:
    """Every pipeline output (data/ without the sources, checkpoints and lock files), train's
    summary without its timings (they measure the machine), extract's pass log aside."""
    data = project / "data"
    out = {}
    for path in sorted(data.rglob("*")):
        rel = path.relative_to(data).as_posix()
        if not path.is_file() or rel.startswith(("sources/", "models/", "checkpoints/")) or path.name.endswith(".lock"):
            continue
        if rel == "extract/extract.json":  # the pass's log (what ran, what was reused, how long): differs by design
            continue
        content = path.read_bytes()
        if rel == f"train/{RUN}/metrics.json":
            summary = json.loads(content)
            content = json.dumps({k: v for k, v in summary.items() if k not in TIMINGS}, sort_keys=True).encode()
        out[rel] = content
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The tiny project's outputs from an uninterrupted run: each stage's dvc.yaml command in a fresh
    interpreter with the stages' environment, as DVC runs it (not in this process, whose earlier
    tests may have changed process-wide state), without DVC itself."""
    import shlex

    import yaml

    project = make_project(tmp_path_factory.mktemp("clean") / "project")
    for name, stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items():
        args = shlex.split(stage["cmd"].replace("${item.site}", SITE).replace("${item.variant}", VARIANT))
        assert args[:2] == ["python", "-m"], stage["cmd"]
        result = subprocess.run([sys.executable, *args[1:]], cwd=project, env=env(), capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{name}: {result.stdout[-2000:]} {result.stderr[-3000:]}"
    return project


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_in_each_stage_then_repro_gives_the_uninterrupted_outputs(uninterrupted, tmp_path):
    """Each stage is killed with SIGKILL mid-way (one `dvc repro` per fault, each resuming what the
    last one left); the final outputs are byte-identical to an uninterrupted run: texts, shards,
    stats, SAE weights, metrics (train's timings aside) and the dvclive curves."""
    project = make_project(tmp_path / "project")
    logs = []
    for stage, fault in KILLS:
        result = dvc(project, "repro", SAEPIPE_TEST_FAULT=fault)
        assert result.returncode != 0, f"the fault in {stage} did not fire: {result.stdout}"
        assert f"failed to reproduce '{DVC_NAMES.get(stage, stage)}'" in result.stderr, result.stderr[-2000:]
        if stage == "train":  # a checkpoint was left to resume from
            assert (project / "data" / "checkpoints" / "train" / RUN / "checkpoint.safetensors").is_file()
        logs.append(result.stdout + result.stderr)
    result = dvc(project, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1.mlp: resuming after 2 complete shards" in logs[2]  # the run after extract's kill (the 3rd was unrecorded)
    assert f"resuming from data/checkpoints/train/{RUN} at step 30" in logs[4]  # the run after train's kill
    want, have = outputs(uninterrupted), outputs(project)
    assert sorted(have) == sorted(want)
    differ = [name for name in want if have[name] != want[name]]
    assert not differ, f"outputs differ from the uninterrupted run: {differ}"
    assert (project / "data" / "train" / RUN / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1] \
        .startswith("1\t")  # the curve keeps its first steps
    assert dvc(project, "status").stdout.strip().endswith("Data and pipelines are up to date.")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killing_only_dvc_leaves_its_stage_running_and_a_second_run_is_refused(tmp_path):
    """kill -9 of `dvc` alone orphans the stage it ran; a new `dvc repro` must not start a second
    copy of that stage beside it: the stage lock refuses it, naming the orphan's pid."""
    project = make_project(tmp_path / "project")
    assert dvc(project, "repro", f"normalize@{SITE}").returncode == 0
    mark = tmp_path / "paused"
    first = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env(SAEPIPE_TEST_FAULT="saepipe.training.checkpoint:save_checkpoint:1:pause",
                                     SAEPIPE_TEST_FAULT_MARK=str(mark)))
    try:
        deadline = time.monotonic() + 300
        while not mark.exists():
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "train never reached its first checkpoint"
            time.sleep(0.2)
        orphan = int(mark.read_text() or 0)
        first.kill()  # SIGKILL to dvc only: the stage goes on
        first.wait(30)
        os.kill(orphan, 0)  # still alive
        second = dvc(project, "repro")
        assert second.returncode != 0
        assert f"stage train is already running (pid {orphan}" in second.stderr, second.stderr[-2000:]
    finally:
        mark.unlink(missing_ok=True)  # release the orphan
    for _ in range(1200):  # let it finish
        try:
            os.kill(orphan, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    assert (project / "data" / "train" / RUN / "sae.safetensors").is_file()  # the orphan finished its work
    result = dvc(project, "repro", f"train@{SITE}-{VARIANT}")  # its outputs are not in dvc.lock: rerun, then consistent
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in dvc(project, "status", f"train@{SITE}-{VARIANT}").stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_changed_source_file_reruns_prepare_also_through_a_symlink(tmp_path):
    """Issue 15 item 1: shortening a local text file reruns prepare; a symlink in data/sources/ to a
    file elsewhere counts too (DVC hashes the target)."""
    project = make_project(tmp_path / "project")
    outside = tmp_path / "elsewhere.jsonl"
    lines = (project / "data" / "sources" / "texts.jsonl").read_text().splitlines(keepends=True)
    outside.write_text("".join(lines[:300]))
    (project / "data" / "sources" / "linked.jsonl").symlink_to(outside)
    params = (project / "params.yaml").read_text().replace("data/sources/texts.jsonl", "data/sources/linked.jsonl")
    (project / "params.yaml").write_text(params)

    assert dvc(project, "repro", "prepare").returncode == 0
    assert json.loads((project / "data" / "prepare" / "counts.json").read_text())["read"] == 300
    assert "up to date" in dvc(project, "status", "prepare").stdout
    outside.write_text("".join(lines[:200]))  # shorten the target
    assert "changed deps" in dvc(project, "status", "prepare").stdout
    assert dvc(project, "repro", "prepare").returncode == 0
    assert json.loads((project / "data" / "prepare" / "counts.json").read_text())["read"] == 200


def test_exp_show_lists_only_headline_metrics(tmp_path):
    """`dvc exp show` lists the 7 headline metrics first, each name once, then the params; every
    other JSON output is a plain output (the shipped project: ~90 columns, it was ~169)."""
    project = make_project(tmp_path / "project")
    for path, keys in ((f"data/train/{RUN}/headline.json", ["train_final_loss", "train_val_fvu"]),
                       (f"data/evaluate/{RUN}/headline.json", ["fvu", "l0", "dead_pct", "ce_loss_score", "kl"])):
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(json.dumps(dict.fromkeys(keys, 0.5)))
    result = dvc(project, "exp", "show", "--csv")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split(",")
    metrics = ["train_final_loss", "train_val_fvu", "fvu", "l0", "dead_pct", "ce_loss_score", "kl"]
    assert header[5:12] == metrics and len(set(header)) == len(header)
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    n_params = sum(len(v) if isinstance(v, dict) else 1 for v in params.values())
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    n_deps = len({d for stage in pipeline.values() for d in stage["deps"]})
    shipped = 5 + len(metrics) + n_params + n_deps  # columns once dvc.lock exists
    assert shipped <= 100, shipped
    assert "sae.k" in header[12:] and "ce_loss_score" in header[:12]


# ------------------------------------------------------------------------------------ full disk
WRITERS_CHILD = """
import errno, json, resource, signal, sys
from pathlib import Path
import numpy as np
import pyarrow.parquet as pq
import saepipe
from saepipe.activations.shards import write_manifest, write_shard
from saepipe.activations.stats import NormStats
from saepipe.evaluation.metrics import DensityHistogram
from saepipe.evaluation.plots import plot_density_histogram, write_density_csv, write_html_report
from saepipe.runtime.files import atomic_write_bytes, write_metrics_json
from saepipe.sae.topk import TopKSAE
from saepipe.texts.prepare import PrepareCounts, PrepareResult, prepared_table, write_prepared
from saepipe.training.checkpoint import save_checkpoint
from saepipe.training.state import TrainState
import mlx.core as mx

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG, like ENOSPC
root = Path(sys.argv[1])
rng = np.random.default_rng(0)
table = prepared_table(["a text"] * 50, ["s"] * 50, ["train"] * 50)
hist = DensityHistogram(np.linspace(-4, 0, 11), np.arange(10), 3)
z = {"W_dec": mx.zeros((64, 16)), "b_dec": mx.zeros(16)}
writers = {
    "shard": lambda p: write_shard(p / "shard-00000.arrow", rng.normal(size=(300, 16)), np.zeros(300),
                                   np.zeros(300), np.arange(300), "float32"),
    "manifest": lambda p: write_manifest(p, {"shards": [{"file": str(i), "rows": i} for i in range(300)]}),
    "stats": lambda p: NormStats(np.zeros(64), np.ones(64), 1.0, 5).save(p / "stats.safetensors"),
    "sae": lambda p: TopKSAE(16, 4, 4).save(p / "sae.safetensors"),
    "checkpoint": lambda p: save_checkpoint(p, TrainState(z, z, z, mx.array(3), mx.zeros(64)), {"x": 1}),
    "metrics": lambda p: write_metrics_json(p / "metrics.json", {"x": list(range(2000))}),
    "prepared": lambda p: write_prepared(PrepareResult(table, PrepareCounts()), p),
    "bytes": lambda p: atomic_write_bytes(p / "blob.bin", b"x" * 100_000, durable=True),
    "density": lambda p: write_density_csv(hist, p / "density.csv"),
    "png": lambda p: plot_density_histogram(hist, p / "density.png"),
    "report": lambda p: write_html_report(p / "report.html", title="t" * 5000, metrics={}, health={}, images={}),
}
results = {}
for name, write in writers.items():
    folder = root / name
    folder.mkdir()
    write(folder)  # a complete previous version
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))
    try:
        write(folder)
        error = None
    except BaseException as err:  # noqa: BLE001 - any error: the files are what is checked
        error = f"{type(err).__name__}: {err}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    after = {f.name: f.read_bytes() for f in folder.iterdir()}
    results[name] = {"error": error, "unchanged": after == before, "names": sorted(after)}
print(json.dumps(results))
"""


def test_disk_full_in_the_middle_of_each_writer_leaves_no_partial_file(tmp_path):
    """Every writer of the pipeline, in a process whose files may not grow past 200 bytes (RLIMIT_FSIZE:
    a full disk without root, in the middle of the write): the write fails, the file under its final
    name is still the previous complete one, and no temporary file is left."""
    result = subprocess.run([sys.executable, "-c", WRITERS_CHILD, str(tmp_path)], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        assert r["error"] is not None, f"{name}: the write did not fail"
        assert r["unchanged"], f"{name}: a failed write changed or left files: {r['names']}"
    assert len(results) == 11


FSIZE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.argv = sys.argv[2:]
import runpy
runpy.run_module("stages.train", run_name="__main__")
"""


def test_train_stage_on_a_full_disk_fails_cleanly(tmp_path):
    """The train stage in a process whose files may not exceed 20 kB (RLIMIT_FSIZE, as a full disk
    but without root): one error line, no traceback, and no file under a final name is partial."""
    from tests.test_train import SMALL, _data, _shard_folder

    acts = tmp_path / "acts"
    _shard_folder(acts, _data(600), layer=1, component="mlp")
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sweep": {"sites": ["1.mlp"]},
                                                          "sae": {**SMALL, "expansion_factor": 8}}))
    out = tmp_path / "train"
    result = subprocess.run([sys.executable, "-c", FSIZE_CHILD, "20000", "train", "--params",
                             str(tmp_path / "params.yaml"), "--acts", str(acts), "--out", str(out)],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Error: " in result.stderr and "File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "sae.safetensors").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_stage_whose_lock_is_held_is_refused_with_the_holder_pid(tmp_path):
    """A second run of a stage on the same outputs fails at once, naming the running one; once that
    process dies (even by SIGKILL) the lock is free."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom saepipe.runtime.locks import stage_lock\n"
                               "with stage_lock(sys.argv[1], 'normalize'):\n    print('held', flush=True)\n"
                               "    time.sleep(600)\n", str(tmp_path / "out")],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from click.testing import CliRunner

        from stages.normalize import main

        (tmp_path / "params.yaml").write_text("normalize:\n  chunk_rows: 10\n")
        result = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "--acts",
                                           str(tmp_path / "acts"), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1
        assert f"stage normalize is already running (pid {holder.pid}" in result.output
        assert f"kill {holder.pid}" in result.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = CliRunner().invoke(main, ["--params", str(tmp_path / "params.yaml"), "--acts",
                                       str(tmp_path / "acts"), "--out", str(tmp_path / "out")])
    assert "already running" not in result.output and "manifest.json not found" in result.output
