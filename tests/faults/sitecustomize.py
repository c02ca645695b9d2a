"""Fault injection for tests/test_faults.py, loaded by a stage's interpreter when this folder is on
PYTHONPATH (Python imports ``sitecustomize`` at start-up). Nothing here runs in normal use.

``SAEPIPE_TEST_FAULT="module:function:N:action"``: when ``module`` is imported, its ``function`` is
wrapped; at the N-th call the process

- ``before``: kills itself with SIGKILL before the call;
- ``after``: kills itself with SIGKILL right after the call returns;
- ``pause``: writes ``$SAEPIPE_TEST_FAULT_MARK`` (its pid) and waits, still alive, until that file
  is removed, then goes on (so a test can act while the stage is mid-way, e.g. kill only ``dvc``).

Modules that import the function by name (``from module import function``) after ``module`` loaded
get the wrapped one, as do calls inside ``module`` itself.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time

SPEC = os.environ.get("SAEPIPE_TEST_FAULT", "")


def _wrap(module, name: str, nth: int, action: str) -> None:
    original = getattr(module, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == nth
        if hit and action == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if hit and action == "pause":
            mark = os.environ["SAEPIPE_TEST_FAULT_MARK"]
            with open(mark, "w") as f:
                f.write(str(os.getpid()))
            while os.path.exists(mark):
                time.sleep(0.05)
        result = original(*args, **kwargs)
        if hit and action == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, wrapper)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, name: str, nth: int, action: str) -> None:
        self.module, self.name, self.nth, self.action = module, name, nth, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _wrap(module, self.name, self.nth, self.action)

        spec.loader.exec_module = exec_and_patch
        return spec


if SPEC:
    _module, _name, _nth, _action = SPEC.split(":")
    if _module in sys.modules:
        _wrap(sys.modules[_module], _name, int(_nth), _action)
    else:
        sys.meta_path.insert(0, _PatchOnImport(_module, _name, int(_nth), _action))
