"""The package's staircase: imports flow one way, entry points → pipelines → building blocks → foundations.

Read from the source with `ast` (nothing is imported): every `import lorakit...` / `from lorakit... import`
anywhere in a module, at the top or inside a function. A module may import its own layer or any layer below,
never one above; the module graph has no cycle; and a lorakit import inside a function is refused outright
(function-level imports are for optional third-party dependencies, never for dodging a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

# Highest layer first; a module's layer is that of its longest matching prefix.
LAYERS: dict[str, int] = {
    "lorakit": 3, "lorakit.__main__": 3, "lorakit.cli": 3, "lorakit.quickstart": 3, "lorakit.demo": 3,
    "lorakit.train": 2, "lorakit.eval": 2, "lorakit.advise": 2, "lorakit.serve": 2, "lorakit.export": 2,
    "lorakit.ui": 2,
    "lorakit.models": 1, "lorakit.adapters": 1, "lorakit.lora": 1, "lorakit.lora_rows": 1, "lorakit.quant": 1,
    "lorakit.data": 1, "lorakit.loss": 1, "lorakit.generate": 1, "lorakit.heads": 1, "lorakit.dora": 1,
    "lorakit.inits": 1,
    "lorakit.config": 0, "lorakit.errors": 0, "lorakit.runtime": 0,
}
NAMES = {3: "entry point", 2: "pipeline", 1: "building block", 0: "foundation"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    prefix = module
    while prefix not in LAYERS:
        if "." not in prefix:
            raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
        prefix = prefix.rsplit(".", 1)[0]
    return LAYERS[prefix]


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def lorakit_imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported lorakit module, line, inside a function) for every import statement in `path`."""
    module, tree = module_name(path), ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child, module, path.name == "__init__.py")
                # `from lorakit.x import y` may name a submodule y or an attribute of x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for t in targets:
                if t == "lorakit" or t.startswith("lorakit."):
                    found.append((t, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def package_graph() -> dict[str, list[tuple[str, int, bool]]]:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): lorakit_imports(p, modules) for p in paths}


def upward_imports(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    return [
        f"{m} ({NAMES[layer(m)]}) line {line} imports {t} ({NAMES[layer(t)]})"
        for m, edges in graph.items() for t, line, _ in edges if layer(t) > layer(m)
    ]


def cycles(graph: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (a package's __init__ importing its own submodules is an
    edge like any other)."""
    edges = {m: sorted({t for t, _, _ in es if t in graph and t != m}) for m, es in graph.items()}
    found, state = [], {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(edges):
        if m not in state:
            dfs(m, [m])
    return found


def test_imports_flow_one_way():
    assert upward_imports(package_graph()) == []


def test_no_import_cycles():
    assert cycles(package_graph()) == []


def test_no_lorakit_import_inside_functions():
    inner = [f"{m} line {line}: {t}" for m, es in package_graph().items() for t, line, fn in es if fn]
    assert inner == []


@pytest.mark.parametrize("planted", ["lorakit.train", "lorakit.cli"])
def test_a_planted_upward_import_is_caught(tmp_path, planted):
    """The checker itself can fail: a building block that imports a pipeline or an entry point."""
    graph = package_graph()
    graph["lorakit.lora"] = graph["lorakit.lora"] + [(planted, 1, False)]
    assert any(f"imports {planted}" in line for line in upward_imports(graph))


def test_a_planted_cycle_is_caught():
    graph = package_graph()
    graph["lorakit.errors"] = graph["lorakit.errors"] + [("lorakit.config", 1, False)]
    graph["lorakit.config"] = graph["lorakit.config"] + [("lorakit.errors", 1, False)]
    assert any({"lorakit.errors", "lorakit.config"} <= set(c) for c in cycles(graph))
