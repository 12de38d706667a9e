"""The house runs one way: every import, read from the source, points to the same layer or below.

Each top-level folder is one layer (docs/architecture.md), imported through pyproject's
``package-dir`` mapping:

1. core: ``loka/`` (formats, recipe, quantize, metrics, kernels, nn, convert, ...)
2. ``probe/`` (``loka.probe``)
3. ``mods/``, ``dispatch/``, ``gate/`` (``loka.mods``, ``loka.dispatch``, ``loka.gate``): peers,
   with no cycle between them
4. ``models/`` (``loka.models``)
5. top: ``app/`` (``loka.app``: the command line and the demo) and the facade ``loka``
   (``loka/__init__.py``), which binds core names eagerly and upper ones lazily through
   ``__getattr__``; any other module importing a name from the facade would import upward.

``bench/`` may import anything and nothing imports it. Every import statement counts, at
module level or inside a function, ``try`` or ``if``, and so does
``importlib.import_module("loka....")`` with a literal name. A function-local import is
allowed only for an optional dependency (``# optional: <why>`` on its line: it may be absent,
e.g. Transformer Engine, or Triton's kernels) or a heavy one (``# heavy: <why>``: slow to
import and needed by few calls, e.g. scipy, matplotlib).
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


# Each top-level folder is one layer; a folder not listed here fails the test (add it to a layer first).
FOLDER_LAYERS = {"loka": 1, "probe": 2, "mods": 3, "dispatch": 3, "gate": 3, "models": 4, "app": 5}


def _folder(module: str) -> str:
    return MODULES[module].relative_to(ROOT).parts[0]


def _layer(module: str) -> int:
    if module == "loka":  # the facade: loads upper layers on first use of their names
        return 5
    return FOLDER_LAYERS[_folder(module)]


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
    return [target for name in names if (target := _resolve(name))]


def _import_module_name(node: ast.AST) -> str | None:
    """The literal module name of ``importlib.import_module("loka...")`` (or a bare ``import_module``)."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    name = node.args[0].value
    return name if called == "import_module" and isinstance(name, str) and name.startswith("loka") else None


def _resolve(name: str) -> str | None:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


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
            elif (dynamic := _import_module_name(node)) and (target := _resolve(dynamic)):
                # a dynamic import is still an import: it loads the module as surely as a statement
                found.append(Import(module, target, node.lineno, False, lines[node.lineno - 1]))
    return found


IMPORTS = _imports()


def test_the_layer_map_covers_the_packages():
    """Guard the test itself: it sees the real tree (a wrong mapping would make every check vacuous)."""
    for name in ("loka.nn", "loka.kernels.kernel", "loka.probe.probe", "loka.dispatch.planner", "loka.gate.compare",
                 "loka.mods.pipeline", "loka.models.ranker", "loka.app.demo.ranker", "loka.app.cli"):
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
            "and m.split('.')[1] in ('probe', 'mods', 'dispatch', 'gate', 'models', 'app')); print(upper)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_top_level_folder_is_one_layer():
    """A package folder is mapped (pyproject) and given a layer here; a new one fails until it is placed."""
    mapped = {folder for folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()}
    assert mapped == set(FOLDER_LAYERS), f"folders without a layer: {mapped - set(FOLDER_LAYERS)}, stale: {set(FOLDER_LAYERS) - mapped}"
    packages_on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages_on_disk <= mapped, f"top-level packages not in pyproject's package-dir: {packages_on_disk - mapped}"
    assert {_folder(m) for m in MODULES} == set(FOLDER_LAYERS)


def _folder_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {folder: set() for folder in FOLDER_LAYERS}
    for i in IMPORTS:
        if i.source != "loka" and _folder(i.source) != _folder(i.target):  # the facade sits on top of its own folder
            graph[_folder(i.source)].add(_folder(i.target))
    return graph


def test_folders_import_downward_only_and_peers_form_no_cycle():
    graph = _folder_graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if FOLDER_LAYERS[b] > FOLDER_LAYERS[a])
    assert not upward, f"folders importing a folder above them: {upward}"
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def cyclic(folder: str) -> bool:
        seen[folder] = 1
        found = any(seen.get(t) == 1 or (t not in seen and cyclic(t)) for t in graph[folder])
        seen[folder] = 2
        return found

    assert not any(cyclic(f) for f in graph if f not in seen), f"folder-level import cycle in {graph}"
    assert graph["app"] and graph["models"] and "loka" in graph["probe"]  # the check sees real edges


def test_a_literal_import_module_counts_as_an_import():
    call = ast.parse("importlib.import_module('loka.models.ranker')").body[0].value
    assert _import_module_name(call) == "loka.models.ranker"
    assert _import_module_name(ast.parse("import_module('json')").body[0].value) is None


def test_nothing_imports_bench():
    """bench/ sits beside the house: it may import any layer, and no library module imports it."""
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{module}: {n}" for n in names if n == "bench" or n.startswith("bench.")]
    assert not offenders, offenders
    assert list((ROOT / "bench").glob("*.py")), "bench/ moved: update this test"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_crosses_a_module():
    """A module's ``_name`` is its own: no other library module (or bench script) imports it or reads it
    off the module. What another module needs is public, with a name that says what it is."""
    crossing = []
    sources = [(m, p) for m, p in MODULES.items()] + [(f"bench.{p.stem}", p) for p in (ROOT / "bench").glob("*.py")]
    for module, path in sources:
        tree = ast.parse(path.read_text())
        module_aliases = {}  # local name -> loka module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = _targets(node, module, path.name == "__init__.py") if module in MODULES else []
                base = targets[0] if targets else (node.module if node.module.startswith("loka") else None)
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        module_aliases[alias.asname or alias.name] = full
                    elif base and _private(alias.name) and base != module:
                        crossing.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {alias.name} from {base}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        module_aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
                    and module_aliases.get(node.value.id, module) != module):
                crossing.append(f"{path.relative_to(ROOT)}:{node.lineno}: reads {node.value.id}.{node.attr} "
                                f"of {module_aliases[node.value.id]}")
    assert not crossing, "private names used outside their module (make them public):\n" + "\n".join(crossing)


def test_import_loka_loads_neither_dynamo_nor_triton():
    """Both are heavy, and triton decides at import whether it interprets (TRITON_INTERPRET): a script
    that picks the interpreter after ``import loka`` (bench/*.py --dry-run) needs triton not loaded yet."""
    code = "import sys, loka; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
