"""A mod declares itself once (its file's ``MOD``); the pipeline, the CLI and the docs read that."""

from __future__ import annotations

import pathlib
import sys
import textwrap

import pytest

from loka.app.cli import main
from loka.mods import MODS, SPECS, ModSpec
from loka.mods.spec import discover, markdown_table

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_mod_is_named_after_its_file_and_registered_once():
    files = {p.stem for p in (ROOT / "mods").glob("*.py") if "\nMOD = ModSpec(" in p.read_text()}
    assert set(SPECS) == files == set(MODS)
    assert all(MODS[name] is spec.apply for name, spec in SPECS.items())
    assert [s.order for s in SPECS.values()] == sorted(s.order for s in SPECS.values())


def test_the_docs_table_is_the_declarations():
    assert markdown_table(SPECS) in (ROOT / "docs" / "mods.md").read_text(), (
        "docs/mods.md's mod table differs from the MOD declarations: paste loka.mods.spec.markdown_table(SPECS)")


def test_mods_list_prints_every_declaration(capsys):
    assert main(["mods", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(SPECS)
    assert all(spec.pattern in line for spec, line in zip(SPECS.values(), out))


def _package(tmp_path, files: dict[str, str]) -> str:
    name = f"toymods_{tmp_path.name}".replace("-", "_")  # a fresh package per test (imports are cached)
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module, source in files.items():
        (pkg / f"{module}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(tmp_path))
    return name


TOY = '''
from loka.mods.result import ModResult
from loka.mods.spec import ModSpec


def apply(model, report=None, *, sample=None):
    return ModResult("{name}", True, "nothing")


MOD = ModSpec(name="{name}", order=5, exact="exact", pattern="nothing -> nothing", apply=apply)
'''


def test_a_new_mod_is_its_file(tmp_path, monkeypatch):
    """The change trace of a new mod: one file (plus its test); discovery finds it, in its order."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    package = _package(tmp_path, {"toy_mod": TOY.format(name="toy_mod"), "helper": "X = 1\n"})
    specs = discover(package)
    assert list(specs) == ["toy_mod"] and specs["toy_mod"].apply(None).name == "toy_mod"
    assert "`toy_mod` | `toy_mod.py` | exact | nothing -> nothing |" in markdown_table(specs)


def test_a_mod_named_unlike_its_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    package = _package(tmp_path, {"misnamed": TOY.format(name="other_name")})
    with pytest.raises(ValueError, match="name the file other_name.py"):
        discover(package)


def test_a_spec_checks_its_fields():
    with pytest.raises(ValueError, match="Python identifier"):
        ModSpec(name="bad-name", order=1, exact="exact", pattern="p", apply=lambda m: m)
    with pytest.raises(ValueError, match="apply must be"):
        ModSpec(name="ok", order=1, exact="exact", pattern="p", apply=None)
