"""A mod declares itself once: ``MOD = ModSpec(...)`` at the end of its own file.

The pipeline (``loka.mods.MODS``), ``loka mods list`` / ``show`` and the table in
docs/mods.md all read these declarations, so adding a mod is its file and its test:
``discover()`` finds every module of this package that defines ``MOD``, and a mod's
name is its file's name (checked here, so the two can never drift apart).
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping


@dataclass(frozen=True)
class ModSpec:
    """One mod: what it is called, how exact it is, the pattern it rewrites, and its ``apply``.

    ``apply(model, report=None, *, sample, **options) -> ModResult``. ``order`` places it in
    the recommended order (``loka mods list``, the docs table). ``show_options`` are the
    options ``loka mods show`` passes on a fresh ranker (e.g. an emulated kernel for a mod
    that needs an FP8 kernel). ``files`` are further modules it is made of.
    """

    name: str
    order: int
    exact: str  # in words, for tables: "exact", "exact in hp", "no change", ...
    pattern: str  # "pattern -> rewrite", one line
    apply: Callable = field(repr=False)
    show_options: tuple[tuple[str, object], ...] = ()  # (option, value) pairs
    files: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"a mod's name is its file's name, a Python identifier; got {self.name!r}")
        if not callable(self.apply):
            raise ValueError(f"mod {self.name!r}: apply must be the mod's apply function, got {self.apply!r}")


def discover(package: str = __package__) -> dict[str, ModSpec]:
    """Every ``MOD`` declared by a module of ``package``, by name, in their recommended order."""
    specs: list[ModSpec] = []
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        source = pathlib.Path(info.module_finder.path, f"{info.name}.py")
        # only files that declare a mod are imported (the CLI and the pipeline read this registry)
        if not source.is_file() or "\nMOD = ModSpec(" not in source.read_text():
            continue
        spec = getattr(importlib.import_module(f"{package}.{info.name}"), "MOD", None)
        if not isinstance(spec, ModSpec):
            raise TypeError(f"{package}.{info.name}.MOD must be a ModSpec, got {type(spec).__name__}")
        if spec.name != info.name:
            raise ValueError(f"mod {spec.name!r} is declared in {info.name}.py: name the file {spec.name}.py")
        specs.append(spec)
    return {s.name: s for s in sorted(specs, key=lambda s: (s.order, s.name))}


def markdown_table(specs: Mapping[str, ModSpec]) -> str:
    """The table docs/mods.md shows (a test keeps the doc equal to it)."""
    rows = ["| mod (`loka.mods.MODS`) | module | exact? | pattern -> rewrite |", "|---|---|---|---|"]
    for s in specs.values():
        files = ", ".join(f"`{f}`" for f in (f"{s.name}.py", *s.files))
        rows.append(f"| `{s.name}` | {files} | {s.exact} | {s.pattern} |")
    return "\n".join(rows)
