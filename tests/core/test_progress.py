"""loka.progress: a tqdm bar where tqdm is installed, plain lines on stderr where it is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpu_machine import as_on_the_gpu_machine

from loka.progress import PlainProgress

ROOT = Path(__file__).resolve().parents[2]


def test_plain_lines_every_tenth_and_at_the_end(capsys):
    n = 37
    items = list(PlainProgress(range(n), desc="probe"))
    assert items == list(range(n))
    lines = capsys.readouterr().err.splitlines()
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert all(line.startswith("probe: ") and line.endswith(f"/{n}") for line in lines)
    assert counts == sorted(counts) and counts[-1] == n and 9 <= len(counts) <= 11  # about every tenth


def test_update_postfix_write_close_as_tqdm(capsys):
    with PlainProgress(total=4, desc="train", initial=1) as bar:
        bar.set_postfix(loss="0.5000")
        bar.update(1)
        bar.write("step 2: skipped")
        bar.update(2)
    err = capsys.readouterr().err.splitlines()
    assert err == ["train: 2/4 loss=0.5000", "step 2: skipped", "train: 4/4 loss=0.5000"]


def test_disabled_prints_nothing_and_unknown_total_counts(capsys):
    list(PlainProgress(iter(range(5)), desc="x", disable=True))
    assert capsys.readouterr().err == ""
    bar = PlainProgress(iter(range(3)), desc="eval")
    list(bar)
    bar.close()
    assert capsys.readouterr().err.splitlines()[-1] == "eval: 3"


def test_without_tqdm_progress_falls_back_to_plain_lines(tmp_path):
    code = ("from loka.progress import progress_bar\n"
            "bar = progress_bar(range(20), desc='probe')\n"
            "print(type(bar).__name__, sum(bar))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=as_on_the_gpu_machine(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PlainProgress", "190"] and "probe: 20/20" in proc.stderr
