"""Dependencies point one way: CLI/app -> library -> core; core imports only third-party packages."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_qwen2"
LAYERS = {
    "core": {"model", "cache", "sample", "quantize", "tokenizer", "blas", "fast", "adapters", "data"},
    "library": {"checkpoint", "gguf_import", "gptq", "loader", "generation", "trainer", "cli"},
    "app": {"generate", "convert", "chat", "lora", "fuse"},
}
RANK = {m: i for i, layer in enumerate(LAYERS.values()) for m in layer}
CORE_THIRD_PARTY = {"mlx", "numpy", "tokenizers", "jinja2"}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level?) for every import of the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is None:  # from . import a, b
            found += [("." * node.level + a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(("." * node.level + node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
    return found


def test_every_module_is_layered():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(RANK), "add new modules to LAYERS"


def test_imports_point_down_and_sit_at_top_level():
    for name, rank in RANK.items():
        for target, at_top in imports(PACKAGE / f"{name}.py"):
            if target.startswith("."):
                dep = target.lstrip(".").split(".")[0]
                assert at_top, f"{name} imports {dep} inside a function"
                assert RANK[dep] <= rank and dep != name, f"{name} ({rank}) imports {dep} ({RANK[dep]})"
            elif rank == 0:
                root = target.split(".")[0]
                stdlib = root in sys.stdlib_module_names
                assert stdlib or root in CORE_THIRD_PARTY, f"core module {name} imports {target}"
