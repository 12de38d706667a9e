"""``loka mods`` subcommands through a fresh parser (with the bundled ranker offered, as ``loka`` does)."""

import argparse

from loka.models.workload import RANKER_WORKLOADS
from loka.mods.cli import register


def _run(argv, named_workloads=RANKER_WORKLOADS):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), named_workloads=named_workloads)
    args = parser.parse_args(argv)
    return args.func(args)


def test_list(capsys):
    assert _run(["mods", "list"]) == 0
    out = capsys.readouterr().out
    assert "scale_migration" in out and "keep_hp" in out


def test_show_padding_on_tiny_ranker(capsys):
    assert _run(["mods", "show", "--size", "tiny", "--batch-size", "8", "--mod", "padding"]) == 0
    assert "over.heads.ctr.linear" in capsys.readouterr().out


def test_show_unknown_mod(capsys):
    assert _run(["mods", "show", "--mod", "nope"]) == 2


def test_show_without_models_names_what_is_offered(capsys):
    """loka.mods knows no model: with none offered, ``show`` says so instead of importing one."""
    assert _run(["mods", "show", "--size", "tiny", "--mod", "padding"], named_workloads={}) == 2
    assert "unknown model size 'tiny'" in capsys.readouterr().err
