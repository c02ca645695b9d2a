"""saepipe's native code on x86-64 CPUs other than this one, under QEMU's user-mode emulation.

QEMU runs a process as if on another CPU model and raises SIGILL for instructions that model lacks
(AVX2 on Nehalem, AVX-512 on every model it emulates). It does not follow child processes, so the
probe is pointed at it explicitly. Checked here:

- the BLAS libraries saepipe ships pass the probe's library checks on an x86-64-v2 CPU (Nehalem) and
  on the AMD AVX2 CPU (EPYC-Rome) the SIGILL of issue 11 was reported on, while a stand-in library
  that stores with AVX-512 (as cmeel-openblas 0.3.31's ``sgemm_beta`` did) dies there with SIGILL —
  and passes natively, so the check can tell them apart;
- numba's on-disk cache, written here, is not reused on another CPU: the emulated process compiles
  its own code and computes the same result.

Needs ``qemu-x86_64`` (Debian's ``qemu-user``; ``./saepipe.sh test`` installs it when it can).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from saepipe.runtime import blas

QEMU = shutil.which("qemu-x86_64")
CPU_MODELS = ("Nehalem", "EPYC-Rome")  # x86-64-v2; AVX2 + FMA without AVX-512 (AMD Zen 2)

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64" or not sys.platform.startswith("linux"),
                       reason="x86-64 CPU levels are emulated on x86-64 Linux hosts only"),
    pytest.mark.skipif(QEMU is None and os.environ.get("SAEPIPE_SKIP_EMULATION_TESTS") == "1",
                       reason="qemu-user is not installed (./saepipe.sh test could not install it)"),
]

AVX512_SGEMM = r"""
#include <immintrin.h>
/* Row-major C = alpha * A @ op(B) + beta * C that scales C with AVX-512 stores. */
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
  for (int i = 0; i < m; i++) {
    int j = 0;
    for (; j + 16 <= n; j += 16) {
      __m512 row = beta == 0.0f ? _mm512_setzero_ps()
                                : _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_loadu_ps(c + i * ldc + j));
      _mm512_storeu_ps(c + i * ldc + j, row);
    }
    for (; j < n; j++) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    for (j = 0; j < n; j++) {
      float s = 0.0f;
      for (int p = 0; p < k; p++) s += a[i * lda + p] * (tb == 112 ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] += alpha * s;
    }
  }
}
"""

NUMBA_MODULE = """
import numba as nb
import numpy as np

@nb.njit(cache=True, fastmath=True)
def dot(a, b):
    s = np.float32(0)
    for i in range(a.size):
        s += a[i] * b[i]
    return s
"""

NUMBA_RUN = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import kernel
a = np.arange(4096, dtype=np.float32) / 4096
value = float(kernel.dot(a, a))
stats = kernel.dot.stats
print(json.dumps({"value": value, "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
"""


def _require_qemu() -> str:
    assert QEMU, ("qemu-x86_64 is needed to check other CPU levels: apt-get install qemu-user "
                  "(or set SAEPIPE_SKIP_EMULATION_TESTS=1)")
    return QEMU


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, blas.ENV_VAR: "0"}  # no BLAS loaded by the interpreter's saepipe hook
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def _probe(library: str, cpu: str | None) -> dict | str:
    """The probe's verdict on ``library`` (library checks only), or the signal it died of."""
    wrapper = [_require_qemu(), "-cpu", cpu] if cpu else []
    done = _run([*wrapper, sys.executable, str(blas._PROBE_SCRIPT), "--without-mlx", library])
    if done.returncode < 0:
        return signal.Signals(-done.returncode).name
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def avx512_library(tmp_path_factory) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler (cc) is needed to build the AVX-512 stand-in library"
    folder = tmp_path_factory.mktemp("avx512")
    (folder / "sgemm.c").write_text(AVX512_SGEMM)
    library = folder / "libavx512_sgemm.so"
    subprocess.run([cc, "-O1", "-mavx512f", "-shared", "-fPIC", str(folder / "sgemm.c"), "-o", str(library)],
                   check=True)
    return str(library)


@pytest.fixture(scope="module")
def shipped_libraries(tmp_path_factory) -> list[blas.Candidate]:
    found = [c for c in blas.candidates(tmp_path_factory.mktemp("blas-cache"))
             if c.name in ("scipy-openblas32", "ngsolve-openblas") and not c.problem]
    assert any(c.name == "scipy-openblas32" for c in found), found
    return found


def test_avx512_stand_in_passes_natively_where_the_cpu_has_avx512(avx512_library):
    flags = Path("/proc/cpuinfo").read_text()
    if " avx512f" not in flags:
        pytest.skip("this CPU has no AVX-512: the stand-in cannot run natively")
    assert _probe(avx512_library, None) == {"ok": True}


@pytest.mark.parametrize("cpu", CPU_MODELS)
def test_avx512_library_dies_with_sigill_on_cpus_without_it(avx512_library, cpu):
    assert _probe(avx512_library, cpu) == "SIGILL"


@pytest.mark.parametrize("cpu", CPU_MODELS)
def test_shipped_blas_libraries_pass_on_older_cpus(shipped_libraries, cpu):
    for candidate in shipped_libraries:
        if candidate.name == "ngsolve-openblas" and cpu != "EPYC-Rome":
            continue  # a fallback: checked on the AVX2 CPU only, to keep emulation time down
        verdict = _probe(candidate.path, cpu)
        if candidate.name == "ngsolve-openblas" and isinstance(verdict, dict) and "libgfortran" in verdict.get("reason", ""):
            continue  # needs the system's libgfortran5, absent here: the probe rejects it cleanly
        assert verdict == {"ok": True}, f"{candidate.name} on {cpu}: {verdict}"


def test_numba_cache_written_here_is_recompiled_on_another_cpu(tmp_path):
    (tmp_path / "kernel.py").write_text(NUMBA_MODULE)
    runner = tmp_path / "run.py"
    runner.write_text(NUMBA_RUN)
    native = json.loads(_run([sys.executable, str(runner), str(tmp_path)]).stdout)
    assert native["misses"] == 1  # compiled and cached here
    again = json.loads(_run([sys.executable, str(runner), str(tmp_path)]).stdout)
    assert again["hits"] == 1 and again["misses"] == 0  # the cache is used on this CPU
    emulated = _run([_require_qemu(), "-cpu", "EPYC-Rome", sys.executable, str(runner), str(tmp_path)])
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    result = json.loads(emulated.stdout.strip().splitlines()[-1])
    assert result["misses"] == 1 and result["hits"] == 0, result  # not this CPU's code: compiled anew
    assert result["value"] == pytest.approx(native["value"], rel=1e-5)
