"""The house runs one way: every import, read from the source, points to the same layer or below.

Layers (docs/architecture.md), by module name under the pyproject ``package-dir`` mapping:

1. core: ``loka.*`` (formats, recipe, quantize, metrics, kernels, nn, convert, ...)
2. ``loka.probe``
3. ``loka.mods``, ``loka.dispatch``, ``loka.gate``
4. ``loka.models``
5. top: ``loka.demo``, ``loka.cli``, and the facade ``loka`` (``loka/__init__.py``), which
   binds core names eagerly and upper ones lazily through ``__getattr__``; any other
   module importing a name from the facade would import upward.

Every import statement counts, at module level or inside a function, ``try`` or ``if``.
A function-local import is allowed only for an optional dependency (``# optional: <why>``
on its line: it may be absent, e.g. Transformer Engine, or Triton's kernels) or a heavy one
(``# heavy: <why>``: slow to import and needed by few calls, e.g. scipy, matplotlib).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCAL_IMPORT_TAGS = ("# optional:", "# heavy:")  # may be absent / slow to import: loaded on first use


def _layer(module: str) -> int:
    parts = module.split(".")
    if module == "loka" or parts[1] in ("demo", "cli"):
        return 5
    return {"probe": 2, "mods": 3, "dispatch": 3, "gate": 3, "models": 4}.get(parts[1], 1)


def _modules() -> dict[str, pathlib.Path]:
    """{dotted module name: source file} from pyproject's package-dir mapping (longest prefix wins)."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found: dict[str, pathlib.Path] = {}
    for package, folder in sorted(mapping.items(), key=lambda kv: len(kv[0])):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *(rel[:-1] if rel[-1] == "__init__" else rel)))
            found[name] = path
    return found


MODULES = _modules()


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported loka module (a package means its __init__)
    line: int
    local: bool  # inside a function
    text: str  # the statement's first source line


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(parent + ([node.module] if node.module else []))
        # `from pkg import sub` imports the submodule `pkg.sub`; `from pkg import name` imports pkg
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES:
            out.append(name)
    return out


def _imports() -> list[Import]:
    found = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path.name == "__init__.py"):
                    found.append(Import(module, target, node.lineno, id(node) in local, lines[node.lineno - 1]))
    return found


IMPORTS = _imports()


def test_the_layer_map_covers_the_packages():
    """Guard the test itself: it sees the real tree (a wrong mapping would make every check vacuous)."""
    for name in ("loka.nn", "loka.kernels.kernel", "loka.probe.probe", "loka.dispatch.planner", "loka.gate.compare",
                 "loka.mods.pipeline", "loka.models.ranker", "loka.demo.ranker", "loka.cli"):
        assert name in MODULES, name
    assert [_layer(m) for m in ("loka.nn", "loka.probe.probe", "loka.gate", "loka.models.ranker", "loka")] == [1, 2, 3, 4, 5]
    assert any(i.source == "loka.nn" and i.target == "loka.kernels" for i in IMPORTS)
    assert sum(i.local for i in IMPORTS) >= 1  # the optional Triton kernels are imported on first use


def test_every_import_points_to_the_same_layer_or_below():
    upward = [f"{MODULES[i.source].relative_to(ROOT)}:{i.line}: {i.source} (layer {_layer(i.source)}) imports "
              f"{i.target} (layer {_layer(i.target)})" for i in IMPORTS if _layer(i.target) > _layer(i.source)]
    assert not upward, "imports that run up the house (see docs/architecture.md):\n" + "\n".join(upward)


def test_function_local_imports_are_only_for_optional_dependencies():
    untagged = [f"{MODULES[i.source].relative_to(ROOT)}:{i.line}: {i.text.strip()}"
                for i in IMPORTS if i.local and not any(t in i.text for t in LOCAL_IMPORT_TAGS)]  # fmt: skip
    # third-party local imports too: the walk above only records loka targets
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for f in ast.walk(ast.parse(path.read_text())):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(f):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(t in lines[node.lineno - 1] for t in LOCAL_IMPORT_TAGS):
                        untagged.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not sorted(set(untagged)), (
        "function-local imports without '# optional: <why>' or '# heavy: <why>' (move them to the top of the module; "
        "a local import is for an optional or heavy dependency only):\n" + "\n".join(sorted(set(untagged))))


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.target != i.source:
            graph[i.source].add(i.target)
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_import_loka_loads_the_core_alone():
    """The facade resolves upper-layer names on first use, so ``import loka`` pulls in no upper layer."""
    code = ("import sys, loka; upper = sorted(m for m in sys.modules if m.startswith('loka.') "
            "and m.split('.')[1] in ('probe', 'mods', 'dispatch', 'gate', 'models', 'demo', 'cli')); print(upper)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
