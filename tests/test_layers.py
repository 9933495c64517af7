"""The package's imports point one way: no cycle between its units, nor between its modules,
and each unit imports only from the floors below its own (FLOORS).

A unit is a subpackage (`cache`, `kernels`, ...) or a top-level module (`model`, `generate`).
Every import counts, at module level and inside functions alike (an import inside a function
that closes a cycle hides it, it does not remove it), relative or absolute.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flashinfer_lite"
ROOT = PACKAGE.name

# The dependency order, bottom first: a unit imports only from lower floors. What each holds:
FLOORS = [
    {"errors"},  # the one exception family
    {"memory", "evaluation", "sampling", "chat_template", "tokenizer"},  # leaves
    {"registry", "reference", "speculative"},  # model names, llama.cpp's logits, drafting
    {"loaders"},  # GGUF and flash-format files, GGUF block layouts, direct I/O
    {"cache"},  # KV caches (storage, one interface) and the neuron pools
    {"kernels"},  # the numeric work: backends, attention over the caches, FFN kernels
    {"options", "prompt_cache", "chat"},  # option dataclasses, the prompt cache, chat encoding
    {"models"},  # one file per architecture, its quirks and its cache layout
    {"config"},  # a GGUF's metadata read into a ModelConfig, through its architecture
    {"vocab", "filter"},  # the vocabulary on flash, GemFilter
    {"generate"},  # the token loop: chunked prefill, sampling, drafts, stop strings, stats
    {"flash"},  # calibration, the flash-format converter, the flash-resident FFN
    {"planning"},  # what a memory budget leaves for the neuron pools and the KV cache
    {"loading"},  # backend choice, conversion, the net, the vocabulary and flash set up
    {"model"},  # the public Model
    {ROOT},  # the package's face: load, Model, the errors
    {"server"},  # the OpenAI-compatible HTTP API
    {"cli"},  # the click app (its `serve` starts the server)
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """flashinfer_lite/cache/kv.py -> flashinfer_lite.cache.kv (a package: its __init__)."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.Module, module: str, is_package: bool,
                     known: set[str]) -> set[str]:
    """The package's own modules that `module` imports anywhere in its source."""
    out = set()
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            out.update(subs or [target])
    # the package's own modules only; `import a.b.c` also runs a.b (ignored: packages' __init__
    # files here import nothing that their submodules import back)
    return {_known_prefix(name, known) for name in out if name.split(".")[0] == ROOT} - {None}


def _known_prefix(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or None


def unit_of(module: str) -> str:
    """flashinfer_lite.cache.kv -> cache; flashinfer_lite.model -> model; the package root
    (its __init__: the public face) -> flashinfer_lite."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def import_graph(package: Path = PACKAGE, sources: dict[str, str] | None = None):
    """{module: modules it imports} for every module of the package. sources: {path relative
    to the package's parent: text} to read instead of the files (tests of this test)."""
    if sources is None:
        sources = {str(p.relative_to(package.parent)): p.read_text()
                   for p in sorted(package.rglob("*.py"))}
    parent = package.parent
    modules = {module_name(parent / rel, package): (rel, text) for rel, text in sources.items()}
    known = set(modules)
    graph = {}
    for name, (rel, text) in modules.items():
        tree = ast.parse(text, filename=rel)
        deps = imported_modules(tree, name, rel.endswith("__init__.py"), known)
        graph[name] = deps - {name}
    return graph


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, deps in graph.items():
        u = unit_of(module)
        units.setdefault(u, set()).update(unit_of(d) for d in deps)
    return {u: deps - {u} for u, deps in units.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first, sorted for a stable
    answer)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_units_form_no_cycle():
    cycle = find_cycle(unit_graph(import_graph()))
    assert cycle is None, "import cycle between units: " + " -> ".join(cycle)


def test_modules_form_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle)


def test_units_import_only_from_lower_floors():
    """Units not placed in FLOORS yet are left to the cycle checks."""
    floor = {unit: i for i, units in enumerate(FLOORS) for unit in units}
    upward = [f"{unit} -> {dep}" for unit, deps in sorted(unit_graph(import_graph()).items())
              for dep in sorted(deps)
              if unit in floor and dep in floor and floor[dep] >= floor[unit]]
    assert not upward, "imports that do not point down: " + ", ".join(upward)


def test_kernels_never_import_models():
    graph = unit_graph(import_graph())
    assert "models" not in graph["kernels"]


# ---- the check itself can fail ----------------------------------------------------------------
@pytest.mark.parametrize("inside_function", [False, True])
def test_a_cycle_is_found_and_named(inside_function):
    """cache -> kernels at module level, kernels -> cache relatively (or inside a function)."""
    back = ("def f():\n    from ..cache.kv import KVBlock\n" if inside_function
            else "from ..cache import kv\n")
    sources = {
        f"{ROOT}/__init__.py": "",
        f"{ROOT}/cache/__init__.py": "",
        f"{ROOT}/cache/kv.py": f"import {ROOT}.kernels.ops\n",
        f"{ROOT}/kernels/__init__.py": "",
        f"{ROOT}/kernels/ops.py": back,
        f"{ROOT}/model.py": "from .cache.kv import KVBlock\nimport numpy\n",
    }
    graph = import_graph(PACKAGE, sources)
    assert graph[f"{ROOT}.kernels.ops"] == {f"{ROOT}.cache.kv"}
    assert graph[f"{ROOT}.model"] == {f"{ROOT}.cache.kv"}
    assert find_cycle(unit_graph(graph)) == ["cache", "kernels", "cache"]
    assert find_cycle(graph) == [f"{ROOT}.cache.kv", f"{ROOT}.kernels.ops", f"{ROOT}.cache.kv"]


def test_an_acyclic_graph_passes():
    sources = {
        f"{ROOT}/__init__.py": "from .model import load\n",
        f"{ROOT}/model.py": "from . import errors\nfrom .cache import kv\n",
        f"{ROOT}/errors.py": "",
        f"{ROOT}/cache/__init__.py": "",
        f"{ROOT}/cache/kv.py": "from ..errors import E\n",
    }
    graph = import_graph(PACKAGE, sources)
    assert graph[f"{ROOT}.model"] == {f"{ROOT}.errors", f"{ROOT}.cache.kv"}
    assert find_cycle(graph) is None and find_cycle(unit_graph(graph)) is None
