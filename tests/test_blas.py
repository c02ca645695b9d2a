"""The BLAS under MLX: candidates are proven in a child process before they are loaded.

Stand-in libraries (compiled here with the system C compiler) die with SIGILL or SIGSEGV, compute
wrong numbers, or are no library at all; each must be rejected with its reason while the next
candidate is used, and nothing of theirs may reach the test process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import saepipe  # noqa: F401  (loads the chosen BLAS before mlx)
from saepipe.runtime import blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only: macOS uses Accelerate")

SGEMM = ("void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, "
         "int lda, const float *b, int ldb, float beta, float *c, int ldc)")
STAND_INS = {
    # dies like cmeel-openblas 0.3.31 on an AVX2-only CPU
    "sigill": f"#include <signal.h>\n{SGEMM} {{ raise(SIGILL); }}\n",
    "sigsegv": f"#include <signal.h>\n{SGEMM} {{ raise(SIGSEGV); }}\n",
    # returns without computing: C keeps the NaN the probe filled it with
    "wrong": f"{SGEMM} {{ }}\n",
    "no_sgemm": "int not_a_blas(void) { return 0; }\n",
}


def _compile(tmp: Path, name: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler (cc) is needed to build the stand-in libraries"
    source = tmp / f"{name}.c"
    source.write_text(STAND_INS[name])
    library = tmp / f"lib{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", str(source), "-o", str(library)], check=True)
    return str(library)


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[blas.Candidate, Path]:
    """The first real candidate this host offers (scipy-openblas32's unprefixed copy here), probed
    once into a verdict cache that tests copy (a real probe takes seconds)."""
    folder = tmp_path_factory.mktemp("blas-cache")
    found = [c for c in blas.candidates(folder) if c.name != blas.ENV_VAR and not c.problem]
    assert found, "no BLAS candidate on this host: the environment lacks scipy-openblas32"
    assert blas.verdict(found[0], folder).ok
    return found[0], folder / blas.VERDICTS_FILE


@pytest.fixture
def real_candidate(probed, tmp_path) -> blas.Candidate:
    """The real candidate, its verdict already in ``tmp_path``'s cache."""
    candidate, verdicts = probed
    shutil.copyfile(verdicts, tmp_path / blas.VERDICTS_FILE)
    return candidate


@pytest.mark.parametrize(("stand_in", "reason"), [
    ("sigill", "died with SIGILL"),
    ("sigsegv", "died with SIGSEGV"),
    ("wrong", "wrong results"),
    ("no_sgemm", "exports no cblas_sgemm"),
])
def test_bad_library_is_rejected_and_the_next_one_used(tmp_path, real_candidate, stand_in, reason):
    bad = blas.Candidate("stand-in", _compile(tmp_path, stand_in))
    chosen, report, _ = blas.select([bad, real_candidate], tmp_path)
    assert chosen == real_candidate
    verdicts = dict(report)
    assert not verdicts[bad].ok and reason in verdicts[bad].reason, verdicts[bad]
    assert verdicts[real_candidate].ok


def test_unloadable_file_is_rejected(tmp_path, real_candidate):
    junk = tmp_path / "libjunk.so"
    junk.write_bytes(b"not an ELF file\n" * 64)
    bad = blas.Candidate("junk", str(junk))
    chosen, report, _ = blas.select([bad, real_candidate], tmp_path)
    assert chosen == real_candidate
    assert "cannot be loaded" in dict(report)[bad].reason
    assert not dict(report)[bad].crashed_or_wrong  # absent or unloadable: not worth a warning


def test_rejection_warns_once_naming_library_and_signal(tmp_path, real_candidate):
    bad = blas.Candidate("stand-in", _compile(tmp_path, "sigill"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blas._warn_rejections(blas.select([bad, real_candidate], tmp_path))
        blas._warn_rejections(blas.select([bad, real_candidate], tmp_path))  # cached: said already
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert bad.path in messages[0] and "SIGILL" in messages[0] and real_candidate.name in messages[0]


def test_verdict_is_cached_and_redone_when_the_library_changes(tmp_path, real_candidate):
    copy = tmp_path / "libcopy.so"
    shutil.copyfile(real_candidate.path, copy)
    candidate = blas.Candidate("copy", str(copy))
    first = blas.verdict(candidate, tmp_path)
    again = blas.verdict(candidate, tmp_path)
    assert first.ok and first.fresh
    assert again.ok and not again.fresh
    with copy.open("ab") as f:
        f.write(b"\0" * 16)  # size and mtime change; the library still loads
    assert blas.verdict(candidate, tmp_path).fresh


def test_verdict_is_redone_on_another_cpu(tmp_path, real_candidate, monkeypatch):
    assert not blas.verdict(real_candidate, tmp_path).fresh
    monkeypatch.setattr(blas, "cpu_signature", lambda: '{"flags": "another cpu"}')
    assert blas.verdict(real_candidate, tmp_path).fresh


def test_passing_libraries_are_raced_once_and_the_fastest_preferred(tmp_path, real_candidate, monkeypatch):
    copy = tmp_path / "libcopy.so"
    shutil.copyfile(real_candidate.path, copy)
    twin = blas.Candidate("copy", str(copy))
    chosen, _, gflops = blas.select([real_candidate, twin], tmp_path)
    assert set(gflops) == {real_candidate.path, twin.path} and min(gflops.values()) > 0
    # an earlier candidate wins unless a later one is clearly faster in the race
    faster = twin if gflops[twin.path] > blas.CLEARLY_FASTER * gflops[real_candidate.path] else real_candidate
    assert chosen == faster
    monkeypatch.setattr(blas, "_run_child", lambda *args: pytest.fail(f"ran a child again: {args}"))
    assert blas.select([real_candidate, twin], tmp_path).gflops == gflops  # cached
    slow = {real_candidate.path: 10.0, twin.path: 10.5}
    monkeypatch.setattr(blas, "race", lambda paths, folder: slow)
    assert blas.select([real_candidate, twin], tmp_path).chosen == real_candidate
    monkeypatch.setattr(blas, "race", lambda paths, folder: {**slow, twin.path: 12.0})
    assert blas.select([real_candidate, twin], tmp_path).chosen == twin


def test_unprefixed_copy_exports_plain_cblas_names(tmp_path, real_candidate):
    symbols = set(blas.defined_dynamic_symbols(Path(real_candidate.path)))
    assert {"cblas_sgemm", "cblas_dgemm", "sgetrf_", "openblas_set_num_threads"} <= symbols
    if real_candidate.name == "scipy-openblas32":
        assert not any(s.startswith("scipy_") for s in symbols)


def test_dynamic_symbols_agree_with_nm(tmp_path):
    library = _compile(tmp_path, "wrong")
    nm = shutil.which("nm")
    assert nm, "binutils' nm is needed to cross-check the ELF reader"
    listed = subprocess.run([nm, "-D", "--defined-only", library], capture_output=True, text=True, check=True)
    expected = {line.split()[-1] for line in listed.stdout.splitlines() if line.strip()}
    assert set(blas.defined_dynamic_symbols(Path(library))) == expected


def test_mlx_matmul_equals_numpy_on_the_chosen_blas():
    import mlx.core as mx

    assert blas.loaded_path is not None, f"no fast BLAS was loaded: {blas.selection}"
    assert blas.selection is not None and blas.selection.chosen.path == blas.loaded_path
    rng = np.random.default_rng(1)
    a = rng.standard_normal((700, 333), dtype=np.float32)
    b = rng.standard_normal((333, 517), dtype=np.float32)
    got = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu), dtype=np.float64)
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
