"""Every user error of the `loka` command is one line on stderr naming the problem, exit code 2,
no traceback (`--debug` shows it); `--version`, and a description for every command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from loka.app.cli import build_parser, main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from loka.models.checkpoint import save_checkpoint
    from loka.models.config import RankerConfig
    from loka.models.ranker import Ranker

    d = tmp_path_factory.mktemp("cli")
    (d / "bad.json").write_text('{"x":\n')
    save_checkpoint(d / "tiny.pt", Ranker(RankerConfig.from_size("tiny")))
    return d


CASES = [
    ("train --size huge --steps 1", ["'huge'", "tiny"]),
    ("eval --checkpoint nope.pt", ["nope.pt", "does not exist"]),
    ("serve --checkpoint {d}/tiny.pt --plan {d}/bad.json", ["bad.json", "not valid JSON"]),
    ("mods show --size huge", ["'huge'", "tiny"]),
    ("bench-kernels --shape 0,16,16", ["--shape", ">= 1"]),
    ("plan --report {d}/bad.json --out {d}/plan.json", ["bad.json", "not valid JSON"]),
]


@pytest.mark.parametrize("command, words", CASES, ids=[c.split(" --")[0] for c, _ in CASES])
def test_user_error_is_one_line_and_exit_2(files, capsys, command, words):
    rc = main(command.format(d=files).split())
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"loka {command.split()[0]}") and all(w in err for w in words), err


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="huge"):
        main(["train", "--size", "huge", "--steps", "1", "--debug"])
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["--debug", "plan", "--report", str(files / "bad.json"), "--out", str(files / "p.json")])


def test_the_installed_command_exits_2_with_one_line(files):
    """The real entry point, in a fresh process: exit status 2 and one stderr line."""
    run = subprocess.run([sys.executable, "-m", "loka.app.cli", "mods", "show", "--size", "huge"],
                         capture_output=True, text=True, timeout=3600)  # hang guard only
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_version_and_a_description_for_every_command(capsys):
    import loka

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"loka {loka.__version__}"
    parser = build_parser()

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{path} {name}", sub
                    yield from walk(sub, f"{path} {name}")

    commands = dict(walk(parser, "loka"))
    assert {"loka doctor", "loka plan", "loka bench-kernels", "loka mods show"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description and sub.description.strip(), f"{name} has no description"
        assert "``" not in sub.format_help(), f"{name}'s help shows double backticks"


def _options(parser, command: list[str]) -> dict[str, str]:
    """{option string: dest} of ``loka COMMAND``'s visible options."""
    p = parser
    for name in command:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return {o: a.dest for a in p._actions if a.help is not argparse.SUPPRESS for o in a.option_strings}


VOCABULARY = {
    "--size": [["train"], ["probe"], ["mods", "show"], ["demo"]],
    "--plan": [["train"], ["eval"], ["serve"], ["convert"]],
    "--out": [["train"], ["eval"], ["probe"], ["plan"], ["demo"], ["gate"]],
    "--json": [["eval"], ["gate"], ["convert"], ["bench-kernels"]],
    "--device": [["train"], ["eval"], ["serve"], ["probe"], ["plan"], ["bench-kernels"], ["gate"], ["demo"],
                 ["doctor"], ["convert"]],
    "--eval-examples": [["train"], ["eval"], ["gate"], ["demo"]],
}


@pytest.mark.parametrize("flag", sorted(VOCABULARY))
def test_one_vocabulary_of_flags(flag):
    parser = build_parser()
    missing = [" ".join(c) for c in VOCABULARY[flag] if flag not in _options(parser, c)]
    assert not missing, f"{flag} missing from: {missing}"


@pytest.mark.parametrize("old, new, command", [
    ("--precision", "--plan", ["train"]), ("--examples", "--eval-examples", ["eval"]),
    ("--outputs", "--out", ["eval"]), ("--save-outputs", "--out", ["gate"]),
    ("--baseline-precision", "--baseline-plan", ["gate"]), ("--candidate-precision", "--candidate-plan", ["gate"]),
])
def test_old_flag_names_still_parse_to_the_new_ones(old, new, command):
    base = {"train": [], "eval": ["--checkpoint", "c.pt"], "gate": ["--baseline", "a", "--candidate", "b"]}[command[0]]
    value = "7" if "examples" in new else "x"
    parser = build_parser()
    a = parser.parse_args(command + base + [old, value])
    b = parser.parse_args(command + base + [new, value])
    dest = _options(parser, command)[new]
    assert getattr(a, dest) == getattr(b, dest) == (7 if value == "7" else "x")


def test_eval_json_path_writes_the_results(files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(files / "tiny.pt"), "--eval-examples", "512", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"ctr"} and "| " not in capsys.readouterr().out.splitlines()[0][:2]


def test_readme_commands_parse():
    """The command-line section of the README shows commands the parser takes as written."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = [line.split("#")[0].split() for line in readme.splitlines() if line.startswith("    loka ")]
    assert len(commands) >= 4
    parser = build_parser()
    for words in commands:
        assert parser.parse_args(words[1:]).command == words[1], words


def test_bench_kernels_json_path_writes_the_timings(tmp_path, monkeypatch):
    from loka.dispatch import microbench

    monkeypatch.setattr(microbench, "DEFAULT_CACHE_DIR", tmp_path / "cache")  # not the user's cache
    out = tmp_path / "t.json"
    assert main(["bench-kernels", "--shape", "32,16,16", "--recipes", "tensorwise", "--iters", "1", "--device", "cpu",
                 "--refresh", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["bf16_ms"]) == {"fprop", "dgrad", "wgrad"} and doc["representative"] is False
    assert all(e["median_ms"] > 0 for e in doc["entries"])
