"""dvc.yaml is consistent with the repository: stage modules, code deps, params keys, metrics that DVC can read back."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _entries(stage: dict, kind: str) -> list[tuple[str, dict]]:
    out = []
    for entry in stage.get(kind, []):
        if isinstance(entry, str):
            out.append((entry, {}))
        else:
            out.extend((path, opts or {}) for path, opts in entry.items())
    return out


@pytest.mark.parametrize("name", list(PIPELINE))
def test_stage_module_code_deps_and_params_exist(name):
    stage = PIPELINE[name]
    module = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
    assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
    for dep in stage["deps"]:
        if dep.startswith(("stages/", "saepipe/")):
            assert (ROOT / dep).is_file(), f"{name}: code dep {dep} does not exist"
    for key in stage.get("params", []):
        node = PARAMS
        for part in key.split("."):
            assert part in node, f"{name}: params key {key} is not in params.yaml"
            node = node[part]


@pytest.mark.parametrize("name", list(PIPELINE))
def test_uncached_outputs_are_not_git_ignored(name):
    """An output with cache: false must live in git, or `dvc metrics diff` cannot read other revisions."""
    for kind in ("outs", "metrics", "plots"):
        for path, opts in _entries(PIPELINE[name], kind):
            if opts.get("cache", True):
                continue
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
            assert not ignored, f"{name}: {path} has cache: false but git ignores it"
