"""The ``loka`` command line (top layer): a thin layer over the Python API.

Each package contributes its subcommands through a ``register(subparsers)``
function in its own ``cli.py``; this file wires them together. It is also where
the bundled ranker (``loka.models``) is offered to the layers below that know no
model: its sizes as named workloads for ``loka probe`` / ``loka mods show``, and
its checkpoint evaluation for ``loka gate``.
"""

from __future__ import annotations

import argparse
import sys

from loka.demo import cli as demo_cli
from loka.dispatch import cli as dispatch_cli
from loka.gate import cli as gate_cli
from loka.models import cli as models_cli
from loka.models.gate_inputs import checkpoint_loader
from loka.models.workload import RANKER_WORKLOADS
from loka.mods import cli as mods_cli
from loka.probe import cli as probe_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loka",
        description="FP8 for recommendation models: probe -> plan -> convert -> gate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # in the order shown by --help
    demo_cli.register(sub)
    models_cli.register(sub)
    probe_cli.register(sub, named_workloads=RANKER_WORKLOADS)
    dispatch_cli.register(sub)
    mods_cli.register(sub, named_workloads=RANKER_WORKLOADS)
    gate_cli.register(sub, checkpoint_loader=checkpoint_loader)
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
