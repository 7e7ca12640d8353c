"""Backend-specific speed code. Apple Silicon (Metal) and CUDA run plain MLX; only the CPU has a module here."""
