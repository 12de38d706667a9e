"""``loka mods`` subcommands through a fresh parser."""

import argparse

from loka.mods.cli import register


def _run(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_list(capsys):
    assert _run(["mods", "list"]) == 0
    out = capsys.readouterr().out
    assert "scale_migration" in out and "keep_hp" in out


def test_show_padding_on_tiny_ranker(capsys):
    assert _run(["mods", "show", "--size", "tiny", "--batch", "8", "--mod", "padding"]) == 0
    assert "over.heads.ctr.linear" in capsys.readouterr().out


def test_show_unknown_mod(capsys):
    assert _run(["mods", "show", "--mod", "nope"]) == 2
