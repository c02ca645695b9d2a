"""The ``saepipe`` command: help, params, info, and how repro/run drive DVC (DVC itself is stubbed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from saepipe import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (dvc.yaml + params.yaml) as the current folder; DVC calls are recorded."""
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text("model: default\nsae:\n  k: 8\n")
    calls: list[tuple[list[str], Path]] = []
    monkeypatch.setattr(cli, "_dvc", lambda args, root: calls.append((args, root)) or 0)
    monkeypatch.chdir(tmp_path)
    return tmp_path, calls


def test_help_lists_every_command():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0
    for command in ("repro", "run", "info", "params"):
        assert f"  {command} " in result.output
    for command in ("repro", "run", "info", "params"):
        sub = CliRunner().invoke(cli.main, [command, "-h"])
        assert sub.exit_code == 0 and f"Usage: main {command}" in sub.output


def test_params_fills_defaults_and_checks_keys(project):
    folder, _ = project
    result = CliRunner().invoke(cli.main, ["params"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"] == "default"
    assert shown["sae"]["k"] == 8 and shown["sae"]["expansion_factor"] == 16  # given, then default
    assert set(shown) == {"model", *cli.SECTIONS}
    assert shown["sweep"] == {"sites": ["6.mlp"], "variants": {"default": {}}}
    assert "layer" not in shown["extract"] and shown["normalize"]["chunk_rows"] == 65536
    one = yaml.safe_load(CliRunner().invoke(cli.main, ["params", "evaluate"]).output)
    assert one == {"evaluate": {"max_tokens": 10000, "batch_size": 8}}
    (folder / "params.yaml").write_text("sae:\n  kk: 8\n")
    bad = CliRunner().invoke(cli.main, ["params"])
    assert bad.exit_code != 0 and "kk" in bad.output


def test_params_of_the_shipped_file_are_what_the_stages_read():
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    effective = cli.effective_params(shipped)
    for name, section in shipped.items():
        if isinstance(section, dict):
            assert {k: effective[name][k] for k in section} == {
                k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}


def test_repro_passes_dvc_args_and_prints_the_summary(project):
    folder, calls = project
    (folder / "sub").mkdir()
    result = CliRunner().invoke(cli.main, ["repro", "--dry"])
    assert result.exit_code == 0 and result.output == ""  # nothing produced yet: nothing to print
    metrics = folder / "data" / "evaluate" / "6.mlp" / "default" / "metrics.json"  # the default one-run sweep
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"fvu": 0.29, "l0": 32.0, "health": {"a": {"ok": True}}}))
    result = CliRunner().invoke(cli.main, ["repro", "--force", "--dry"])
    assert result.exit_code == 0, result.output
    assert calls[-1] == (["repro", "--force", "--dry"], folder.resolve())
    assert "FVU (fraction of variance unexplained)" in result.output and "0.2900" in result.output
    assert "health checks: all passed" in result.output
    assert "data/evaluate/6.mlp/default/report.html" in result.output


def test_repro_of_a_sweep_prints_the_summary_table(project):
    folder, _ = project
    (folder / "params.yaml").write_text("sweep:\n  sites: [1.mlp, 2.attn]\n  variants: {a: {}, b: {k: 4}}\n")
    table = folder / "data" / "summary" / "runs.md"
    table.parent.mkdir(parents=True)
    table.write_text("| site | variant |\n|---|---|\n| 1.mlp | a |\n")
    result = CliRunner().invoke(cli.main, ["repro"])
    assert result.exit_code == 0, result.output
    assert "saepipe sweep (4 runs, data/summary/runs.md)" in result.output and "| 1.mlp | a |" in result.output
    assert "data/summary/index.html" in result.output


def test_run_reproduces_one_known_stage(project, monkeypatch):
    folder, calls = project
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder / "sub")  # any folder below the project
    result = CliRunner().invoke(cli.main, ["run", "train", "--single-item"])
    assert result.exit_code == 0, result.output
    assert calls == [(["repro", "train", "--single-item"], folder.resolve())]
    one = CliRunner().invoke(cli.main, ["run", "train@6.mlp-default"])  # one stage of the matrix
    assert one.exit_code == 0 and calls[-1] == (["repro", "train@6.mlp-default"], folder.resolve())
    bad = CliRunner().invoke(cli.main, ["run", "trian"])
    assert bad.exit_code != 0 and "prepare, extract, normalize, train, evaluate, analyze, dashboard, summary" in bad.output


def test_failing_dvc_fails_the_command(project, monkeypatch):
    monkeypatch.setattr(cli, "_dvc", lambda args, root: 3)
    assert CliRunner().invoke(cli.main, ["repro"]).exit_code == 3


def test_outside_a_project_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["repro"])
    assert result.exit_code != 0 and "no dvc.yaml" in result.output


def test_info_names_the_blas_and_the_kernels(project):
    result = CliRunner().invoke(cli.main, ["info"])
    assert result.exit_code == 0, result.output
    assert f"saepipe {cli.__version__}" in result.output
    assert "BLAS: " in result.output and "training kernels: auto -> " in result.output
    assert f"params: {project[0].resolve() / 'params.yaml'}" in result.output


def test_installed_console_script():
    """`saepipe` as installed in the environment (pyproject's [project.scripts]) runs this CLI."""
    script = Path(sys.executable).parent / "saepipe"
    assert script.is_file(), f"no console script at {script}: reinstall the project (uv sync)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: saepipe") and "repro" in result.stdout
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == f"saepipe, version {cli.__version__}"
