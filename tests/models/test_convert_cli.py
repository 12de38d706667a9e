"""`loka convert`: a checkpoint converted with a plan, every Linear accounted for, and the logits'
change on one batch equal to converting a copy by hand."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
import torch
from torch import nn

import loka
from loka.app.cli import build_parser, main
from loka.models.checkpoint import load_model, save_checkpoint
from loka.models.config import RankerConfig
from loka.models.ranker import Ranker
from loka.models.synthetic import SyntheticStream


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("convert") / "tiny.pt"
    save_checkpoint(path, Ranker(RankerConfig.from_size("tiny")))
    return path


def test_convert_accounts_for_every_linear_and_measures_the_change(checkpoint, tmp_path, capsys):
    out = tmp_path / "convert.json"
    assert main(["convert", "--checkpoint", str(checkpoint), "--plan", "fp8", "--json", str(out), "--seed", "3"]) == 0
    doc = json.loads(out.read_text())
    model = load_model(checkpoint).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(doc["converted"]) | set(doc["skipped"]) == set(linears)
    for fqn, why in doc["skipped"].items():  # the only reason here: cuBLAS's alignment rule
        m = linears[fqn]
        assert m.in_features % 16 or m.out_features % 16, (fqn, why)
        assert "not a multiple of 16" in why
    assert all(linears[f].in_features % 16 == 0 and linears[f].out_features % 16 == 0 for f in doc["converted"])
    # the same conversion by hand, compared in fp64
    converted = copy.deepcopy(model)
    loka.convert(converted, recipe="tensorwise")
    batch = SyntheticStream(model.config, 256, seed=3).batch(0)
    with torch.no_grad():
        ref, new = model(batch), converted(batch)
    for task, change in doc["logit_rel_change"].items():
        want = float((new[task].double() - ref[task].double()).norm() / ref[task].double().norm())
        assert change == pytest.approx(want, rel=1e-6) and change > 0
    printed = capsys.readouterr().out
    gate_cmd = next(line for line in printed.splitlines() if line.startswith("next: loka gate"))[len("next: "):]
    args = build_parser().parse_args(shlex.split(gate_cmd)[1:])  # the printed next command parses
    assert args.command == "gate"


def test_convert_with_nothing_to_convert_is_a_one_line_error(checkpoint, capsys):
    assert main(["convert", "--checkpoint", str(checkpoint), "--plan", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "converts nothing" in err
