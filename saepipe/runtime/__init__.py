"""Layer 0, host facts and plumbing: the fast BLAS, its thread count, the allocator, files, params.

Nothing here imports MLX or any other saepipe subpackage; everything above may import from here.
"""
