"""Benchmark scripts (not tests): each prints its figures beside mlx-lm's, measured in the same run."""

import mlx_qwen2  # noqa: F401  (first: picks the optimized BLAS before any benchmark imports mlx.core)
