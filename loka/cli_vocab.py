"""The flag vocabulary every ``loka`` subcommand shares, defined once.

One spelling and one meaning per flag, whatever the command (tests/core/test_cli_vocabulary.py
walks every parser and checks it):

- ``--size``: a ranker size; ``--batch-size N``: examples per batch or step;
- ``--out DIR``: a directory the command writes its files into (named in its help);
- ``--json PATH``: also write the command's result as JSON to PATH (``-``: to stdout);
- ``--device``: a torch device, default ``auto`` (cuda if available, else cpu);
- ``--seed``: the command's own randomness (model init, check batch, bootstrap);
  ``--eval-seed``: the held-out stream.

Old spellings stay accepted for one release as hidden aliases that print a one-line
deprecation note (:data:`DEPRECATED` lists them; the README names them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from loka.jsonio import encode_floats

DEVICE_HELP = "torch device (default auto: cuda if available, else cpu)"
JSON_HELP = "also write {} as JSON to PATH (-: to stdout)"

# (command, old flag) -> new flag; every alias add_alias() creates is listed here once it runs.
DEPRECATED: dict[tuple[str, str], str] = {}


class _DeprecatedAlias(argparse.Action):
    """Store into the new flag's dest and say once on stderr which spelling to use."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Accept ``old`` (hidden from help) as a deprecated spelling of ``new``, already added to ``parser``."""
    target = next(a for a in parser._actions if new in a.option_strings)
    kwargs.setdefault("type", target.type)
    parser.add_argument(old, dest=target.dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)
    DEPRECATED[(parser.prog.split(" ", 1)[-1], old)] = new


def add_device(parser: argparse.ArgumentParser, what: str = "") -> None:
    """``--device``, default ``auto``; :func:`resolve_device` turns ``auto`` into cuda or cpu."""
    parser.add_argument("--device", default="auto", help=(what + ": " if what else "") + DEVICE_HELP)


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", default=None, metavar="PATH", help=JSON_HELP.format(what))


def resolve_device(name: str | None) -> str:
    """``"auto"`` (or None) -> ``"cuda"`` when a GPU is present, else ``"cpu"``; other names as given."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def write_json(path: str, doc) -> None:
    """``--json PATH``: ``doc`` as strict JSON (non-finite floats as strings; a str is taken as JSON
    text already) to PATH, or to stdout for ``-``."""
    text = doc if isinstance(doc, str) else json.dumps(encode_floats(doc), indent=2, allow_nan=False)
    if path == "-":
        print(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    print(f"wrote {path}", file=sys.stderr)


def out_file(out: str, name: str) -> Path:
    """``--out DIR`` -> ``DIR/name`` (DIR created). A path ending in ``name``'s suffix is the old
    file spelling, still taken as that file (deprecated: ``--out`` is a directory)."""
    path = Path(out)
    if path.suffix == Path(name).suffix:
        print(f"--out {out}: a file path is deprecated; --out names a directory (writes {name} there)",
              file=sys.stderr)
    else:
        path = path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
