"""Thin shim: `python convert.py ...` is `python -m mlx_qwen2.convert ...`."""

import sys

from mlx_qwen2.convert import main

if __name__ == "__main__":
    sys.exit(main())
