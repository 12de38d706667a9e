"""``loka mods``: list the mods, and show what each would change on the bundled ranker.

    loka mods list
    loka mods show --size tiny [--batch-size 64] [--mod padding --mod horizontal_fusion]

``show`` applies each mod to its own fresh copy of the ranker (nothing is
saved) and prints the ModResult tables: the sites found by pattern, before ->
after, and the sites skipped with the reason. The full before/after error and
shape table is ``bench/mods_report.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Mapping

from loka.cli_vocab import add_alias
from loka.mods.pipeline import MODS, SPECS
from loka.probe.workload import NamedWorkload


def register(subparsers, *, named_workloads: Mapping[str, NamedWorkload] | None = None) -> None:
    """Add ``loka mods``; ``show`` runs on ``named_workloads`` (``loka.app.cli`` gives the bundled ranker's sizes)."""
    p = subparsers.add_parser("mods", help="model adaptations (Mods) for FP8 stability and speed")
    sub = p.add_subparsers(dest="mods_command", metavar="SUBCOMMAND")
    lst = sub.add_parser("list", help="list the mods and whether each is exact")
    lst.set_defaults(func=_list)
    show = sub.add_parser("show", help="apply mods to a fresh bundled ranker and print what changed")
    show.add_argument("--size", default="tiny", help="ranker size (tiny, small, ...)")
    show.add_argument("--batch-size", type=int, default=64, help="sample batch size for pattern discovery (default 64)")
    add_alias(show, "--batch", "--batch-size")
    show.add_argument("--mod", action="append", default=None, help="mod name (repeatable; default: all)")
    show.set_defaults(func=_show, named_workloads=dict(named_workloads or {}))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _list(args: argparse.Namespace) -> int:
    for spec in SPECS.values():
        print(f"{spec.name:<20} {spec.exact}: {spec.pattern}")
    return 0


def _show(args: argparse.Namespace) -> int:
    names = args.mod or list(MODS)
    unknown = [n for n in names if n not in MODS]
    if unknown:
        print(f"loka mods show: unknown mod(s) {unknown}; choose from {list(MODS)} (`loka mods list`)", file=sys.stderr)
        return 2

    named = getattr(args, "named_workloads", None) or {}
    if args.size not in named:
        print(f"loka mods show: unknown model size {args.size!r}; choose from {sorted(named)}", file=sys.stderr)
        return 2
    sample = named[args.size](batch_size=args.batch_size).make_batch(0)
    for name in names:
        options = dict(SPECS[name].show_options)
        model = named[args.size](batch_size=args.batch_size).model  # a fresh copy for each mod
        print(MODS[name](model, sample=sample, **options).table())
        print()
    return 0
