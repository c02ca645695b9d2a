"""dvc.yaml is consistent with the repository: stage modules, code deps (exactly what each stage
imports), params keys, metrics that DVC can read back, caches that do not count as code.

Matrix stages are checked as DVC expands them over params.yaml (``train@6.mlp-default``, ...)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.import_graph import closure, module_files

ROOT = Path(__file__).resolve().parents[1]


def resolved_stages(root: Path) -> dict[str, dict]:
    """dvc.yaml's stages as DVC expands them over the folder's params.yaml (matrix stages become
    ``name@key`` entries with ``${item...}`` filled in)."""
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return DataResolver(repo, str(root), yaml.safe_load((root / "dvc.yaml").read_text())).resolve()["stages"]


PIPELINE = resolved_stages(ROOT)
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
CODE = ("stages/", "saepipe/")


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
    for dep in _code_deps(stage):
        assert (ROOT / dep).exists(), f"{name}: code dep {dep} does not exist"
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


def _code_deps(stage: dict) -> list[str]:
    return [dep for dep in stage["deps"] if dep.startswith(CODE)]


def _closure_files(stage: dict) -> set[str]:
    """The project files the stage's module can import, at any depth (function-level imports too)."""
    module = re.search(r"python -m (\S+)", stage["cmd"]).group(1)
    files = module_files()
    return {files[m].relative_to(ROOT).as_posix() for m in closure(module)}


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


@pytest.mark.parametrize("name", list(PIPELINE))
def test_code_deps_cover_the_import_closure(name):
    """Editing any code a stage runs must rerun it: every file of its import closure is a dep, or
    lies in a folder that is; and no code dep is stale (covers nothing the stage imports)."""
    stage = PIPELINE[name]
    files, deps = _closure_files(stage), _code_deps(stage)
    missing = sorted(f for f in files if not any(_covers(d, f) for d in deps))
    assert not missing, f"{name}: dvc.yaml deps miss {missing} (add the file or its saepipe/ subpackage)"
    stale = [d for d in deps if not any(_covers(d, f) for f in files)]
    assert not stale, f"{name}: code deps {stale} are not imported by the stage"


def test_caches_next_to_the_code_do_not_change_a_code_dep():
    """Folder deps hash every file in them: a fresh __pycache__ (Python's .pyc, numba's .nbi/.nbc)
    must be ignored (.dvcignore), or every stage would rerun after its code was first imported."""
    from dvc.repo import Repo

    stage = Repo(str(ROOT)).stage.collect("train")[0]  # the matrix group: its first stage
    dep = next(d for d in stage.deps if d.def_path == "saepipe/training")
    code = ROOT / "saepipe" / "training"
    tag = uuid.uuid4().hex[:8]
    fresh = code / f"probe_{tag}"  # a new folder, so its __pycache__ is fresh too
    caches = [code / "__pycache__" / f"probe_{tag}.cpython-311.pyc", fresh / "__pycache__" / "x.cpython-311.pyc",
              code / "__pycache__" / f"probe_{tag}.nbi", code / "__pycache__" / f"probe_{tag}.nbc",
              code / f"probe_{tag}.nbi", code / f"probe_{tag}.nbc"]
    control = fresh / "real_code.py"
    before = dep.get_hash()
    try:
        for path in caches:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"cache")
        assert dep.get_hash() == before, "a cache file changed the hash of a code dep: see .dvcignore"
        control.write_text("x = 1\n")
        assert dep.get_hash() != before  # the check above can fail: real code does change the hash
    finally:
        for path in [*caches, control]:
            path.unlink(missing_ok=True)
        for folder in (fresh / "__pycache__", fresh):
            if folder.is_dir():
                folder.rmdir()


def test_every_stage_group_is_expanded():
    """The shipped sweep (one site, one variant) gives one stage per dvc.yaml entry, named by DVC."""
    assert list(PIPELINE) == ["prepare", "extract", "normalize@6.mlp", "train@6.mlp-default",
                              "evaluate@6.mlp-default", "analyze@6.mlp-default", "dashboard@6.mlp-default", "summary"]
