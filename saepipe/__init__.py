"""saepipe: TopK sparse autoencoders on language-model activations with MLX."""

from saepipe import _blas

_blas.ensure_fast_blas()  # must precede the first `import mlx`

__version__ = "0.1.0"
