"""The installed layout: every package folder is listed in pyproject and importable as loka.*."""

from __future__ import annotations

import importlib
import pathlib
import tomllib

import loka

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for top, name in dirs.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"pyproject packages differ from folders: missing {found - listed}, extra {listed - found}"


def test_public_api_names_resolve():
    for name in loka.__all__:
        assert getattr(loka, name) is not None, name
    for sub in ("dispatch", "models", "mods", "probe", "gate"):
        assert importlib.import_module(f"loka.{sub}").__name__ == f"loka.{sub}"
