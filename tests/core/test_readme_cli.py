"""The README's command-line block runs top to bottom as printed (issue 29, item 16), and a missing
checkpoint's message names the command that writes one."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from loka.app.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_cli_block() -> list[list[str]]:
    """The indented ``loka ...`` lines of the README's "## Command line" section, split as a shell would."""
    text = README.read_text()
    section = text[text.index("## Command line"):]
    section = section[:section.index("\n## ", 3)]
    return [shlex.split(line) for line in section.splitlines() if line.startswith("    loka ")]


@pytest.mark.slow
def test_the_readme_cli_block_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
    commands = readme_cli_block()
    assert [c[1] for c in commands][:2] == ["train", "probe"] and commands[-1][1] == "gate"
    monkeypatch.chdir(tmp_path)  # the block's relative paths land in a fresh directory
    for words in commands:
        rc = main(words[1:])
        out = capsys.readouterr()
        assert rc == 0, f"{shlex.join(words)} -> exit {rc}: {out.err[-2000:]}"
    assert out.out.startswith("loka gate:")
    assert (tmp_path / "runs/plan/plan.json").is_file() and (tmp_path / "runs/plan_accuracy/plan.json").is_file()


def test_a_missing_checkpoint_names_the_command_that_writes_one(tmp_path, capsys):
    for command in (["convert", "--plan", "fp8"], ["eval"], ["serve"]):
        rc = main([command[0], "--checkpoint", str(tmp_path / "runs/small/checkpoint.pt"), *command[1:]])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert "does not exist" in err and "`loka train --size SIZE --out DIR`" in err, err
