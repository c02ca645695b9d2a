"""Load a fast BLAS before MLX on Linux.

The ``mlx[cpu]`` wheel for Linux links the *reference* BLAS (~3 GFLOP/s on a 2048^3 sgemm).
MLX resolves ``cblas_sgemm`` & co. through the dynamic linker, so a BLAS loaded earlier with
``RTLD_GLOBAL`` wins: Debian's OpenBLAS makes the same matmul ~40x faster. This module must run
before ``mlx`` is first imported; ``saepipe/__init__.py`` imports it first thing, and the
``saepipe_fastblas.pth`` hook installed with the package runs it at interpreter start-up.

Nothing here runs on macOS, where MLX uses Accelerate/Metal.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
import warnings

#: Set to a path to force a specific BLAS shared library, or to "0" to skip loading one.
ENV_VAR = "SAEPIPE_BLAS"

# Debian/Fedora builds: used when the PyPI wheel (cmeel-openblas, a dependency) cannot load.
# (Debian bookworm's 0.3.21 predates Sapphire Rapids and falls back to a slow generic kernel there.)
_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

FIX_HINT = (
    "the bundled OpenBLAS (cmeel-openblas) needs libgfortran 5: `apt-get install libgfortran5` "
    "(Fedora: `dnf install libgfortran`); or install a system OpenBLAS (`apt-get install "
    "libopenblas0-pthread`); or point SAEPIPE_BLAS at a libopenblas.so"
)

loaded_path: str | None = None
_warned = False


def _candidates() -> list[str]:
    """The PyPI wheel's OpenBLAS first (recent, knows current CPUs), then system copies."""
    site_dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    wheel = [os.path.join(d, "cmeel.prefix", "lib", "libopenblas.so.0") for d in sorted(site_dirs)]
    return [p for p in (*wheel, *_SYSTEM_CANDIDATES) if os.path.exists(p)]


def load_fast_blas() -> str | None:
    """Load OpenBLAS globally (Linux only); return its path, or None when none was loaded."""
    global loaded_path
    if loaded_path is not None or not sys.platform.startswith("linux"):
        return loaded_path
    choice = os.environ.get(ENV_VAR, "")
    if choice == "0":
        return None
    # OpenBLAS threads spin ~2^28 cycles (~0.1 s) after each call by default, stealing the cores
    # from whatever runs next (the numba kernels of saepipe.cpu_step ran 2-3x slower): ~0.4 ms.
    # Read when a library loads, so it also reaches numpy's OpenBLAS when numpy comes later.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
    for path in [choice] if choice else _candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded_path = path
        return path
    return None


def warn_if_slow() -> None:
    """Warn once when MLX will run on the reference BLAS."""
    global _warned
    if _warned or not sys.platform.startswith("linux") or loaded_path is not None:
        return
    if os.environ.get(ENV_VAR) == "0":
        return
    _warned = True
    mlx_first = "mlx.core" in sys.modules and loaded_path is None
    why = "mlx was imported before saepipe could load it" if mlx_first else "none was found"
    warnings.warn(
        f"saepipe: no fast BLAS for MLX ({why}); matmuls run ~40x slower on the reference BLAS. "
        f"To fix: {FIX_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )


def ensure_fast_blas() -> None:
    if "mlx.core" not in sys.modules:
        load_fast_blas()
    warn_if_slow()
