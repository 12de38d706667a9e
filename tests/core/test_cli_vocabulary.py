"""One flag vocabulary across every `loka` subcommand (issue 29, item 19; loka/cli_vocab.py).

Walks every parser: one spelling per meaning, old spellings hidden, parsed to the new dest and
announced as deprecated; named input files checked before a missing option; `--version` imports
no subcommand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from loka.app.cli import build_parser, main
from loka.cli_vocab import DEPRECATED


def _commands(parser=None, path=()):
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def _visible(sub) -> dict[str, argparse.Action]:
    return {o: a for a in sub._actions if a.help is not argparse.SUPPRESS for o in a.option_strings}


COMMANDS = dict(_commands())


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=" ".join)
def test_every_command_speaks_the_vocabulary(command):
    options = _visible(COMMANDS[command])
    assert "--batch" not in options, "examples per batch is --batch-size"
    if "--device" in options:
        assert options["--device"].default == "auto" and "auto" in options["--device"].help
    if "--json" in options:
        assert options["--json"].metavar == "PATH"
    if "--out" in options:
        assert options["--out"].metavar == "DIR", "--out names a directory"
    if "--seed" in options:
        assert "stream" not in (options["--seed"].help or ""), "the held-out stream's seed is --eval-seed"
    if "--eval-seed" in options:
        assert "stream" in options["--eval-seed"].help
    if "--model" in options:
        assert options["--model"].metavar == "MODULE:FACTORY", "a ranker size is --size"


def test_every_command_with_a_result_has_json_path():
    wanted = {"demo", "train", "eval", "serve", "info", "probe", "plan", "bench-kernels", "convert", "gate"}
    missing = sorted(c for c in wanted if "--json" not in _visible(COMMANDS[(c,)]))
    assert not missing, missing


@pytest.mark.parametrize("command, old, new, value", [
    (["info"], "--batch", "--batch-size", "64"), (["mods", "show"], "--batch", "--batch-size", "64"),
    (["eval", "--checkpoint", "c.pt"], "--seed", "--eval-seed", "7"),
    (["eval", "--checkpoint", "c.pt"], "--outputs", "--out", "d"),
    (["train"], "--precision", "--plan", "fp8"),
])
def test_old_spellings_parse_to_the_new_dest_and_say_deprecated(command, old, new, value, capsys):
    parser = build_parser()
    a = parser.parse_args(command + [old, value])
    assert capsys.readouterr().err.strip().endswith(f"{old} is deprecated; use {new}")
    b = parser.parse_args(command + [new, value])
    assert vars(a) == vars(b)
    assert DEPRECATED[(" ".join(c for c in command if not c.startswith("-") and c != "c.pt"), old)] == new


def test_every_hidden_option_is_a_listed_deprecated_spelling():
    listed = {old for (_, old) in DEPRECATED}
    for command, sub in COMMANDS.items():
        hidden = [o for a in sub._actions if a.help is argparse.SUPPRESS for o in a.option_strings]
        assert set(hidden) <= listed | {"--debug"}, (command, hidden)


@pytest.mark.parametrize("argv, command", [("info --size huge", "info"), ("probe --size huge --out unused", "probe"),
                                           ("mods show --size huge", "mods show"), ("train --size huge", "train")])
def test_a_bad_size_is_one_line_and_exit_2(capsys, argv, command):
    assert main(argv.split()) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"loka {command}") and "'huge'" in err and "tiny" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("command", [["serve", "--plan", "{}"], ["plan", "--report", "{}"]])
def test_a_named_file_is_checked_before_a_missing_option(tmp_path, capsys, command):
    bad = tmp_path / "bad.json"
    bad.write_text('{"x":\n')
    assert main([c.format(bad) for c in command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err and "not valid JSON" in err, err
    with pytest.raises(SystemExit) as exit_:  # a good (or absent) file: then the missing option
        main([command[0]])
    assert exit_.value.code == 2 and "required" in capsys.readouterr().err


def test_version_imports_no_subcommand():
    code = ("import sys\nfrom loka.app.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('loka.models', 'loka.probe', 'loka.dispatch', "
            "'loka.gate', 'loka.mods', 'loka.app.demo', 'scipy', 'matplotlib'))))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["loka 0.1.0", "[]"], run.stdout


def test_train_json_path_writes_the_result(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert main(["train", "--size", "tiny", "--steps", "2", "--batch-size", "16", "--eval-examples", "0",
                 "--no-progress", "--out", str(tmp_path / "run"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["steps"] == 2 and doc["examples_per_s"] > 0 and doc["evaluation"] is None
    assert doc["checkpoint"] == str(tmp_path / "run" / "checkpoint.pt") and (tmp_path / "run" / "checkpoint.pt").is_file()
