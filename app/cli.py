"""The ``loka`` command line (top layer): a thin layer over the Python API.

Each package contributes its subcommands through a ``register(subparsers)``
function in its own ``cli.py``; this file wires them together. It is also where
the bundled ranker (``loka.models``) is offered to the layers below that know no
model: its sizes as named workloads for ``loka probe`` / ``loka mods show``, and
its checkpoint evaluation for ``loka gate``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loka import __version__
from loka.cli_vocab import resolve_device
from loka.jsonio import read_json

# Each subcommand -> the module whose register(subparsers, **wiring) adds it, in --help's order.
# Modules are imported only for the command run (`loka --version` imports none of them).
COMMANDS = {
    "demo": "loka.app.demo.cli",
    "train": "loka.models.cli", "eval": "loka.models.cli", "serve": "loka.models.cli", "info": "loka.models.cli",
    "probe": "loka.probe.cli",
    "doctor": "loka.dispatch.cli", "plan": "loka.dispatch.cli", "bench-kernels": "loka.dispatch.cli",
    "mods": "loka.mods.cli",
    "convert": "loka.models.convert_cli",
    "headroom": "loka.models.headroom_cli",
    "gate": "loka.gate.cli",
}
# What this layer offers the layers below that know no model: keyword -> (module, attribute).
_WIRING = {
    "loka.probe.cli": {"named_workloads": ("loka.models.workload", "RANKER_WORKLOADS"),
                       "headroom": ("loka.models.headroom_cli", "probe_headroom")},
    "loka.mods.cli": {"named_workloads": ("loka.models.workload", "RANKER_WORKLOADS")},
    "loka.gate.cli": {"checkpoint_loader": ("loka.models.gate_inputs", "checkpoint_loader")},
}


def _attribute(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``loka`` parser: every subcommand, or (``command``) only that one's, or (``""``) none."""
    parser = argparse.ArgumentParser(
        prog="loka",
        description="FP8 for recommendation models: probe -> plan -> convert -> gate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = list(dict.fromkeys(COMMANDS.values())) if command is None else [COMMANDS[command]] if command else []
    for name in modules:
        wiring = {k: _attribute(*where) for k, where in _WIRING.get(name, {}).items()}
        importlib.import_module(name).register(sub, **wiring)
    _finish_help(parser)
    return parser


def _parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """Only the named command's modules are imported; ``--version`` alone imports none."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        return build_parser(command)
    if command is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        return build_parser("")
    return build_parser()


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


def _required_later(parser: argparse.ArgumentParser) -> dict[str, dict[str, str]]:
    """Make each command's required options optional to argparse and return {command: {dest: flag}},
    so that a named file's problem is reported before a missing option (``serve --plan bad.json``)."""
    out: dict[str, dict[str, str]] = {}
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    for name, p in (sub.choices.items() if sub else ()):
        for a in p._actions:
            if a.required and a.option_strings:
                a.required = False  # still said in its help, and checked by _check_named_files_then_required
                a.help = f"{a.help} (required)" if a.help else "required"
                out.setdefault(name, {})[a.dest] = a.option_strings[0]
    return out


def _check_named_files_then_required(args, required: dict[str, str], parser) -> None:
    """With a required option missing, first check the JSON files the command was given (a missing or
    malformed file is the message), then say which option is missing (argparse's usage line, exit 2)."""
    missing = [flag for dest, flag in required.items() if getattr(args, dest, None) in (None, [])]
    if not missing:
        return
    sub = parser._subparsers._group_actions[0].choices[args.command]
    for action in sub._actions:
        values = getattr(args, action.dest, None) if action.option_strings else None
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and value.endswith(".json"):
                read_json(value, f"{action.option_strings[0]}")
    sub.error(f"the following arguments are required: {', '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error ends as one line on stderr and exit 2 (``--debug``: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser_for(argv)
    required = _required_later(parser)
    args = parser.parse_args(argv)
    # `loka train --nproc N` relaunches this command through torchrun, as `python -m <this module>`
    args._argv, args._cli_module = list(argv), __spec__.name
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _check_named_files_then_required(args, required.get(args.command, {}), parser)
    except ValueError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"loka {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if getattr(args, "device", None) == "auto":
        args.device = resolve_device("auto")
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
