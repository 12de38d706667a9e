"""The ``loka`` command line: a thin layer over the Python API.

Each package contributes its subcommands through a ``register(subparsers)``
function in its own ``cli.py``; this file only wires them together, importing
each package lazily so ``loka --help`` stays fast and a broken optional piece
cannot take the whole CLI down silently (its error is printed by name).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it provides) in the order shown by --help.
_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "loka.demo_cli",
    "loka.models.cli",
    "loka.probe.cli",
    "loka.dispatch.cli",
    "loka.mods.cli",
    "loka.gate.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loka",
        description="FP8 for recommendation models: probe -> plan -> convert -> gate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that package has no commands yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
