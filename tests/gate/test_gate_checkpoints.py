"""Checkpoint inputs: loka.models scores ranker checkpoints (+ precision) on the same held-out examples for the gate."""

from __future__ import annotations

import argparse

import pytest
import torch

from loka.gate import GateInputError, gate
from loka.gate.cli import register
from loka.gate.outputs import is_eval_outputs_file
from loka.models.gate_inputs import CheckpointEval, checkpoint_loader, gate_checkpoints, load_side

models = pytest.importorskip("loka.models.checkpoint")
from loka.models.config import RankerConfig  # noqa: E402
from loka.models.ranker import Ranker  # noqa: E402

FAST_EVAL = CheckpointEval(eval_examples=1024, batch_size=512)


def _checkpoint(path, *, teacher_seed: int = 0, **config_overrides) -> str:
    cfg = RankerConfig.from_size("tiny", **config_overrides)
    model = Ranker(cfg)
    models.save_checkpoint(path, model, train_config={"teacher_seed": teacher_seed, "eval_seed": 123})
    return str(path)


def test_checkpoint_is_evaluated_to_outputs(tmp_path):
    ckpt = _checkpoint(tmp_path / "a.pt")
    out = load_side("baseline", ckpt, "bf16", FAST_EVAL)
    assert out.n == 1024 and set(out.tasks) >= {"ctr"}
    assert out.meta["info"]["precision"] == "bf16" and not is_eval_outputs_file(ckpt)
    saved = tmp_path / "a.npz"
    out.save(saved)
    assert is_eval_outputs_file(saved)
    with pytest.raises(ValueError, match="applies to checkpoints"):
        load_side("baseline", str(saved), "bf16", FAST_EVAL)


def test_same_checkpoint_passes_against_its_saved_outputs(tmp_path):
    ckpt = _checkpoint(tmp_path / "a.pt")
    saved = tmp_path / "a.npz"
    load_side("baseline", ckpt, None, FAST_EVAL).save(saved)
    r = gate_checkpoints(str(saved), ckpt, checkpoint_eval=FAST_EVAL, n_boot=200)
    assert r.verdict == "identical" and r.exit_code == 0 and all(c.estimate == 0.0 for c in r.checks)


def test_checkpoints_of_different_models_exit_2(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.pt")
    b = _checkpoint(tmp_path / "b.pt", over_hidden=(16,))
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers(), checkpoint_loader=checkpoint_loader)
    args = parser.parse_args(["gate", "--baseline", a, "--candidate", b, "--eval-examples", "1024"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "different models" in err and "over_hidden" in err and "Traceback" not in err


def test_checkpoints_with_different_held_out_labels_exit_2(tmp_path):
    a = _checkpoint(tmp_path / "a.pt", teacher_seed=0)
    b = _checkpoint(tmp_path / "b.pt", teacher_seed=1)  # another synthetic ground truth
    with pytest.raises(GateInputError, match="labels differ"):
        gate_checkpoints(a, b, checkpoint_eval=FAST_EVAL)


def test_bad_checkpoint_and_precision(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"not": "a checkpoint"}, junk)
    with pytest.raises(GateInputError, match="neither saved EvalOutputs nor a loka ranker checkpoint"):
        gate_checkpoints(str(junk), str(junk), checkpoint_eval=FAST_EVAL)
    ckpt = _checkpoint(tmp_path / "a.pt")
    with pytest.raises(GateInputError, match="precision"):
        gate_checkpoints(ckpt, ckpt, baseline_precision="fp7", checkpoint_eval=FAST_EVAL)


def test_the_gate_itself_reads_only_saved_outputs(tmp_path, capsys):
    """A checkpoint (or any other file) handed to the gate without loka.models is refused in one line, unread."""
    ckpt = _checkpoint(tmp_path / "a.pt")
    other = tmp_path / "outputs.csv"
    other.write_text("example_id,prob\n1,0.5\n")
    for path in (ckpt, str(other)):
        with pytest.raises(GateInputError, match=r"not saved EvalOutputs \(\.npz"):
            gate(path, path)
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers())  # no checkpoint loader wired
    args = parser.parse_args(["gate", "--baseline", ckpt, "--candidate", ckpt])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "only through loka.models" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fault, named", [("site", "no.such.site"), ("kernel", "kernel 'no_such_kernel'")])
def test_a_plan_that_does_not_fit_is_one_line_and_exit_2(tmp_path, capsys, fault, named):
    from torch import nn

    from loka.dispatch.plans import GemmChoice, Plan, SitePlan

    ckpt = _checkpoint(tmp_path / "a.pt")
    kernel = "no_such_kernel" if fault == "kernel" else "emulated"
    linears = [(fqn, m) for fqn, m in Ranker(RankerConfig.from_size("tiny")).named_modules() if isinstance(m, nn.Linear)]
    if fault == "site":
        linears.append(("no.such.site", linears[0][1]))
    sites = [SitePlan(fqn, m.in_features, m.out_features, 64,
                      {g: GemmChoice(kernel, "rowwise", "test plan", 0.03, 25.0) for g in ("fprop", "dgrad", "wgrad")})
             for fqn, m in linears]
    plan = Plan(sites=sites, budget={}).save(tmp_path / "plan.json")
    parser = argparse.ArgumentParser(prog="loka")
    register(parser.add_subparsers(), checkpoint_loader=checkpoint_loader)
    args = parser.parse_args(["gate", "--baseline", ckpt, "--candidate", ckpt, "--candidate-plan", str(plan),
                              "--eval-examples", "256"])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "re-plan" in err, err
