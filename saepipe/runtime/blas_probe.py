"""Prove a BLAS library on this host, in a child process: ``python blas_probe.py LIBRARY``.

(``--without-mlx`` stops after the library's own checks: cheap enough to run under a CPU emulator.)

``saepipe.runtime.blas`` runs this file as a script (never imports it) before it loads a candidate
library into its own process: a library built for another CPU dies here with SIGILL instead of
killing the user's run. The checks follow what MLX does with the library:

1. load it with ``RTLD_GLOBAL`` (as saepipe does) and call its ``cblas_sgemm`` directly, big enough
   for OpenBLAS's multi-threaded path, with beta 0 (C full of NaN must be ignored: the
   ``sgemm_beta`` kernel that crashed on AVX2-only CPUs) and beta 1, plain and transposed, on
   shapes that are no multiple of any kernel tile;
2. import MLX, check that it resolves the library's ``cblas_sgemm`` and that its CPU matmul,
   ``addmm`` and an LAPACK-backed inverse give the right numbers.

``--race LIBRARY...`` times proven libraries' sgemm in alternation in one process (the speed used
to choose among working candidates).

References are float64 ``np.einsum`` (numpy's loops, no BLAS). The verdict is one JSON line on
stdout; a crash shows as the child's signal.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import numpy as np

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
TOLERANCE = 1e-4  # max |error| / max |reference|: float32 sums over a few hundred terms


def _sgemm(lib: ctypes.CDLL, a: np.ndarray, b: np.ndarray, c: np.ndarray, *, trans_b: bool,
           alpha: float, beta: float) -> None:
    """C = alpha * A @ op(B) + beta * C in place (row-major float32)."""
    m, k = a.shape
    n = c.shape[1]
    fn = lib.cblas_sgemm
    fn.restype = None
    fp = ctypes.POINTER(ctypes.c_float)
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, fp, ctypes.c_int, fp, ctypes.c_int,
                                       ctypes.c_float, fp, ctypes.c_int]
    fn(ROW_MAJOR, NO_TRANS, TRANS if trans_b else NO_TRANS, m, n, k, alpha,
       a.ctypes.data_as(fp), k, b.ctypes.data_as(fp), b.shape[1], beta, c.ctypes.data_as(fp), n)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_cblas(lib: ctypes.CDLL, rng: np.random.Generator) -> list[str]:
    """Direct ``cblas_sgemm`` calls; returns the failed checks."""
    m, n, k = 263, 211, 149  # m*n*k ~30x OpenBLAS's single-thread limit (65536 * 4)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    bt = np.ascontiguousarray(b.T)
    c0 = rng.standard_normal((m, n), dtype=np.float32)
    ab = np.einsum("ik,kj->ij", a.astype(np.float64), b.astype(np.float64))
    failed = []
    for name, trans_b, beta, start, want in (
        ("beta 0", False, 0.0, np.full((m, n), np.nan, np.float32), 1.5 * ab),
        ("beta 1", False, 1.0, c0.copy(), 1.5 * ab + c0),
        ("beta 0, B transposed", True, 0.0, np.full((m, n), np.nan, np.float32), 1.5 * ab),
    ):
        c = start
        _sgemm(lib, a, bt if trans_b else b, c, trans_b=trans_b, alpha=1.5, beta=beta)
        if _relative_error(c, want) > TOLERANCE:
            failed.append(f"cblas_sgemm {name}: relative error {_relative_error(c, want):.2g}")
    return failed


def check_mlx(rng: np.random.Generator) -> list[str]:
    """MLX's CPU matmul, addmm and inverse on the loaded library; returns the failed checks."""
    import mlx.core as mx  # only after the library under test was loaded (MLX resolves it then)

    failed = []
    cpu = mx.cpu
    a = rng.standard_normal((257, 150), dtype=np.float32)
    b = rng.standard_normal((150, 131), dtype=np.float32)
    c = rng.standard_normal((257, 131), dtype=np.float32)
    ab = np.einsum("ik,kj->ij", a.astype(np.float64), b.astype(np.float64))
    got = mx.matmul(mx.array(a), mx.array(b), stream=cpu)
    if (err := _relative_error(np.array(got), ab)) > TOLERANCE:
        failed.append(f"mlx matmul: relative error {err:.2g}")
    got = mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=1.0, stream=cpu)
    if (err := _relative_error(np.array(got), 0.5 * ab + c)) > TOLERANCE:
        failed.append(f"mlx addmm: relative error {err:.2g}")
    s = rng.standard_normal((96, 96)).astype(np.float32)
    spd = s @ s.T + 96 * np.eye(96, dtype=np.float32)
    inv = np.array(mx.linalg.inv(mx.array(spd), stream=cpu)).astype(np.float64)
    if (err := float(np.abs(inv @ spd - np.eye(96)).max())) > 1e-3:
        failed.append(f"mlx inverse (LAPACK): |inv(A) A - I| = {err:.2g}")
    return failed


def race(libraries: list[str], rounds: int = 7) -> dict[str, float]:
    """sgemm GFLOP/s of each (already proven) library: the median of ``rounds`` timings taken in
    alternation, so load from other processes slows every library alike. The size doubles from
    256 until the first library takes >= 20 ms (a CPU emulator times a small one)."""
    libs = [ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL) for path in libraries]  # each resolves to itself
    rng = np.random.default_rng(0)
    size = 256
    while True:
        a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
        c = np.zeros((size, size), np.float32)
        for lib in libs:  # warm-up: thread pools started, buffers allocated
            _sgemm(lib, a, b, c, trans_b=False, alpha=1.0, beta=0.0)
        start = time.perf_counter()
        _sgemm(libs[0], a, b, c, trans_b=False, alpha=1.0, beta=0.0)
        if time.perf_counter() - start >= 0.02 or size >= 1024:
            break
        size *= 2
    seconds: list[list[float]] = [[] for _ in libs]
    for _ in range(rounds):
        for lib, times in zip(libs, seconds, strict=True):
            start = time.perf_counter()
            _sgemm(lib, a, b, c, trans_b=False, alpha=1.0, beta=0.0)
            times.append(time.perf_counter() - start)
    return {path: float(f"{2 * size**3 / float(np.median(times)) / 1e9:.4g}")
            for path, times in zip(libraries, seconds, strict=True)}


def _address(function: ctypes._CFuncPtr) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value or 0


def probe(library: str, *, with_mlx: bool = True) -> dict[str, object]:
    try:
        lib = ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        return {"ok": False, "reason": f"cannot be loaded: {err}"}
    if not hasattr(lib, "cblas_sgemm"):
        return {"ok": False, "reason": "exports no cblas_sgemm"}
    if _address(ctypes.CDLL(None).cblas_sgemm) != _address(lib.cblas_sgemm):
        # MLX would resolve another library's sgemm: the checks below would prove that one instead.
        return {"ok": False, "reason": "another BLAS was loaded first (run the probe with SAEPIPE_BLAS=0)"}
    rng = np.random.default_rng(0)
    failed = check_cblas(lib, rng)
    if failed:
        return {"ok": False, "reason": "wrong results: " + "; ".join(failed)}
    if not with_mlx:
        return {"ok": True}
    failed = check_mlx(rng)
    if failed:
        return {"ok": False, "reason": "wrong results through MLX: " + "; ".join(failed)}
    return {"ok": True}


USAGE = "usage: python blas_probe.py [--without-mlx] LIBRARY | python blas_probe.py --race LIBRARY..."

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--race"] and len(args) > 1:
        print(json.dumps({"gflops": race(args[1:])}))
    else:
        with_mlx = "--without-mlx" not in args
        args = [a for a in args if a != "--without-mlx"]
        if len(args) != 1:
            sys.exit(USAGE)
        print(json.dumps(probe(args[0], with_mlx=with_mlx)))
