"""The ``loka`` command line (top layer): a thin layer over the Python API.

Each package contributes its subcommands through a ``register(subparsers)``
function in its own ``cli.py``; this file wires them together. It is also where
the bundled ranker (``loka.models``) is offered to the layers below that know no
model: its sizes as named workloads for ``loka probe`` / ``loka mods show``, and
its checkpoint evaluation for ``loka gate``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from loka import __version__
from loka.demo import cli as demo_cli
from loka.dispatch import cli as dispatch_cli
from loka.gate import cli as gate_cli
from loka.models import cli as models_cli
from loka.models import convert_cli
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
    convert_cli.register(sub)
    gate_cli.register(sub, checkpoint_loader=checkpoint_loader)
    _finish_help(parser)
    return parser


def _finish_help(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--version`` on the top command and ``--debug`` on every command; every command gets a
    description (its help line when it has none) and help text without double backticks."""
    debug = "show the full traceback of an error instead of its one-line message"
    if top:
        parser.add_argument("--version", action="version", version=f"loka {__version__}")
        parser.add_argument("--debug", action="store_true", help=debug)
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, sub in action.choices.items():
            if not sub.description and helps.get(name):
                sub.description = helps[name][0].upper() + helps[name][1:] + "."
            # SUPPRESS: a subcommand's default never hides `loka --debug COMMAND`
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
            _finish_help_texts(sub)
            _finish_help(sub, top=False)


def _finish_help_texts(parser: argparse.ArgumentParser) -> None:
    if parser.description:
        parser.description = parser.description.replace("``", "`")
    if parser.epilog:
        parser.epilog = parser.epilog.replace("``", "`")
    for a in parser._actions:
        if isinstance(a.help, str):
            a.help = a.help.replace("``", "`")


# Errors a user's input causes (a bad flag value, a missing or malformed file): one line and exit 2.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError)


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _quiet_library_noise() -> None:
    """Import-time log lines that say nothing about the command (a CPU build of torchao lacks its
    SM90 kernels; torch deprecates a registration torchao makes); ``--debug`` keeps them."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error ends as one line on stderr and exit 2 (``--debug``: the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # `loka train --nproc N` relaunches this command through torchrun, as `python -m <this module>`
    args._argv, args._cli_module = list(sys.argv[1:] if argv is None else argv), __spec__.name
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not getattr(args, "debug", False):
        _quiet_library_noise()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        print(f"loka {args.command}: error: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
