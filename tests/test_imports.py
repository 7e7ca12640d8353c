"""Dependencies point one way: app -> library -> core; core imports only a few third-party packages; no cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_qwen2"
LAYERS = {
    "core": {
        "models",
        "models.base",
        "models.rope",
        "models.qwen2",
        "models.experts",
        "models.qwen2_moe",
        "cache",
        "cache.kv",
        "cache.rotating",
        "cache.quantized",
        "cache.batch",
        "cache.batch_kinds",
        "cache.prefix",
        "cache.config",
        "cache.files",
        "sample",
        "tokenizer",
        "errors",
        "files",
        "backends",
        "backends.cpu",
        "backends.cpu.blas",
        "backends.cpu.kernels",
        "backends.cpu.layers",
        "backends.cpu.elementwise",
        "backends.cpu.experts",
        "backends.cpu.decoder",
        "backends.cpu.fast",
        "backends.metal",
        "quant",
        "quant.affine",
        "quant.recipes",
        "quant.dequantize",
        "quant.gptq",
        "quant.calibration",
        "tuner",
        "tuner.adapters",
        "tuner.data",
    },
    "library": {
        "",  # the package itself: the public API
        "writer",
        "gguf_import",
        "loader",
        "parallel",
        "generation",
        "generation.settings",
        "generation.text",
        "generation.step",
        "generation.stream",
        "generation.batch",
        "generation.grammar",
        "generation.speculative",
        "prompts_file",
        "conversion",
        "tuner.trainer",
        "tuner.checkpoint",
        "cli",
    },
    "app": {"generate", "convert", "chat", "lora", "fuse", "cache_prompt"}
    | {
        f"server{m}"
        for m in ("", ".app", ".schema", ".tools", ".runner", ".metrics", ".guard", ".completions", ".plan")
    }
    | {f"server{m}" for m in (".settings", ".main", ".__main__")},
}
RANK = {m: i for i, layer in enumerate(LAYERS.values()) for m in layer}
CORE_THIRD_PARTY = {"mlx", "numpy", "tokenizers", "jinja2"}


def module_name(path: Path) -> str:
    """'quant.gptq' for mlx_qwen2/quant/gptq.py, 'quant' for its __init__.py, '' for the package's."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, path: Path) -> list[str]:
    parts = name.split(".") if name else []
    return parts if path.name == "__init__.py" else parts[:-1]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(target, at top level?) for every import of a file; targets inside the package are resolved to module
    names ('quant.dequantize'), others kept as written ('mlx.core')."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    base = package_of(module_name(path), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            anchor = base[: len(base) - (node.level - 1)]
            target = ".".join(anchor + (node.module.split(".") if node.module else []))
            for a in node.names:  # `from . import x` and `from .pkg import module` name modules
                sub = f"{target}.{a.name}" if target else a.name
                found.append(("." + (sub if sub in RANK else target), id(node) in top))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = {t[1:] for t, _ in imports(path) if t.startswith(".")}
    return edges


def test_every_module_is_layered():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(RANK), "add new modules to LAYERS"


@pytest.mark.parametrize("name", sorted(RANK))
def test_imports_point_down_and_sit_at_top_level(name):
    path = PACKAGE.joinpath(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    rank = RANK[name]
    for target, at_top in imports(path):
        if target.startswith("."):
            dep = target[1:]
            assert at_top, f"{name} imports {dep} inside a function"
            assert dep in RANK, f"{name} imports {dep}, which is not a module of the package"
            assert RANK[dep] <= rank and dep != name, f"{name} ({rank}) imports {dep} ({RANK[dep]})"
        elif rank == 0:
            root = target.split(".")[0]
            stdlib = root in sys.stdlib_module_names
            assert stdlib or root in CORE_THIRD_PARTY, f"core module {name} imports {target}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a ring, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_even_inside_a_layer():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_relative_imports_resolve_to_modules():
    found = dict(imports(PACKAGE / "quant" / "gptq.py"))
    assert ".models" in found and ".models.qwen2" in found and ".quant.dequantize" in found
    assert ".backends.cpu.blas" in dict(imports(PACKAGE / "__init__.py"))
