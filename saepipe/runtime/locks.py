"""One run of a stage at a time per output folder: a lock file that names the process holding it.

Killing only ``dvc`` (kill -9, a closed terminal) does not stop the stage it started: the stage keeps
running, orphaned, and a new ``dvc repro`` would start a second copy that writes the same outputs.
Each stage therefore holds ``stage_lock(out_dir)`` while it runs: an exclusive ``flock`` on
``<out_dir's folder>/.<out_dir's name>.lock`` (next to the outputs, never inside them, so DVC does not
hash it). The kernel releases the lock when the process ends, however it ends, so a lock is never
stale; the file's content (pid, start time, command) only says who holds it. A second run fails at
once with ``StageBusyError`` naming that process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; stages run unguarded there
    fcntl = None  # type: ignore[assignment]


class StageBusyError(RuntimeError):
    """Another process holds the stage's lock; the message names it and what to do."""


RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
"""What ``mlx.launch`` / ``mpirun`` set in each rank's environment (``saepipe.parallel.ranks``)."""


def lock_path(out_dir: str | Path) -> Path:
    """The lock file of a stage writing ``out_dir``: a hidden file next to it. The ranks of one
    ``mlx.launch`` run the same stage together: each rank but 0 has a lock of its own (rank 0 and a
    plain process share one, so a plain run and a launched one still exclude each other)."""
    out = Path(out_dir).resolve()
    rank = next((os.environ[v] for v in RANK_VARIABLES if os.environ.get(v, "").strip() not in ("", "0")), None)
    return out.parent / (f".{out.name}.lock" if rank is None else f".{out.name}.rank{rank.strip()}.lock")


@contextlib.contextmanager
def stage_lock(out_dir: str | Path, stage: str) -> Iterator[Path]:
    """Hold the lock of ``out_dir`` for the ``with`` block, or raise ``StageBusyError``."""
    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageBusyError(_busy_message(stage, path)) from None
        holder = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _busy_message(stage: str, path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    pid = holder.get("pid", "?")
    started = holder.get("started", "at an unknown time")
    return (f"stage {stage} is already running (pid {pid}, started {started}; lock {path}). If you killed "
            f"dvc, its stage went on running: wait for it to finish, or stop it (kill {pid}), then run again")


__all__ = ["RANK_VARIABLES", "StageBusyError", "lock_path", "stage_lock"]
