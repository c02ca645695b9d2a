"""saepipe: TopK sparse autoencoders on language-model activations with MLX.

The package is layered (see docs/architecture.md): ``runtime`` (0), ``lm`` and ``texts`` (1),
``activations`` (2), ``sae`` (3), ``training`` (4), ``evaluation`` (5), then ``api`` and ``cli``;
a module imports only from its own layer or lower ones (tests/test_layout.py).
"""

import importlib

from saepipe.runtime import blas as _blas
from saepipe.runtime.version import __version__

_blas.ensure_fast_blas()  # must precede the first `import mlx` (nothing above imports it)

# Public API, imported lazily (PEP 562): a .pth hook imports saepipe in every interpreter of the
# environment, so `import saepipe` must stay light (no mlx, no transformers until asked for).
_LAZY = {
    "InterpretableModel": "saepipe.api",
    "IncompatibleSAEError": "saepipe.api",
    "load_sae": "saepipe.api",
    "Steer": "saepipe.analysis.steering",
    "SAEConfig": "saepipe.sae.config",
    "TopKSAE": "saepipe.sae.topk",
    "Dictionary": "saepipe.sae.dictionary",
    "load_model": "saepipe.lm.model",
    "tiny_random_model": "saepipe.lm.model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'saepipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
