"""MLX's CPU backend: the OpenBLAS preload (`blas`) and the float32 layers (`layers`).

Importing this package imports nothing else, so `blas.preload()` can run before `mlx.core` loads.
"""
