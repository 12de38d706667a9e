"""The project's own quality gate on the bundled ``tiny`` ranker.

One short training run gives a ranker that beats the constant predictor; it is scored
on held-out synthetic examples three ways:

- **the loka plan**: probe -> plan -> convert as a user runs it on this machine. On CPU
  the plan keeps every GEMM in bf16 (FP8 is emulated here and never faster), so the
  candidate predicts exactly what the baseline does and the gate must say so
  (``identical``, exit 0); a plan that converts sites must pass the 0.02% NE budget;
- **e5m2, no scaling**: every site's forward activations cast to e5m2 with a static
  scale of 1.0 (the issue's example of a harmful plan). On ``tiny`` its NE change is
  small next to the noise of a CPU-sized eval set, so the gate cannot show it is within
  budget and must not pass it (exit code 1, as a regression or inconclusive);
- **e5m2, mis-scaled**: the same cast with a static scale off by 2^20, which flushes
  every activation below e5m2's smallest subnormal: the model loses its features, and
  the gate must call it an NE regression outright.
"""

from __future__ import annotations

import copy

import pytest
import torch

import loka
import loka.gate.testing
from loka.gate import gate
from loka.recipe import HP_GEMM, GemmRecipe, OperandRecipe, Recipe

pytest.importorskip("loka.models.train")
pytest.importorskip("loka.dispatch.planner")
from loka.models.evaluate import evaluate  # noqa: E402
from loka.models.synthetic import SyntheticStream  # noqa: E402
from loka.models.train import train  # noqa: E402

pytestmark = pytest.mark.slow  # one training run (~30 s of CPU), shared by the module

EVAL_EXAMPLES = 4096
FAST = {"n_boot": 400}


@pytest.fixture(scope="module")
def trained():
    """(model, held-out stream, bf16 EvalOutputs) of a briefly trained tiny ranker."""
    torch.manual_seed(int(torch.randint(0, 1 << 30, ())))
    model = train(size="tiny", steps=60, batch_size=256, warmup_steps=5, progress=False, device="cpu").model
    stream = SyntheticStream(model.config, 4096, seed=1_000_003)
    report = evaluate(model, stream, n_examples=EVAL_EXAMPLES)
    assert report.tasks["ctr"].ne < 0.99, "the ranker must beat the constant predictor for this test to mean anything"
    return model, stream, report.outputs


def _e5m2_forward(model, scale: float):
    harmful = Recipe(
        name="e5m2-static-forward",
        fprop=GemmRecipe(OperandRecipe(format="e5m2", scaling="static"), OperandRecipe(format="e4m3")),
        dgrad=HP_GEMM,
        wgrad=HP_GEMM,
    )
    candidate = copy.deepcopy(model)
    result = loka.convert(candidate, recipe=harmful, kernels="emulated")
    assert result.converted and not result.skipped, result.table()
    for module in candidate.modules():
        if isinstance(module, loka.Float8Linear):
            module.set_static_scale("input", scale, gemm="fprop")
    return candidate


@pytest.fixture(scope="module")
def loka_plan(trained):
    """The plan loka makes for the trained ranker on this machine: probe -> plan."""
    from loka.dispatch import Budget, plan
    from loka.probe.config import ProbeConfig, SamplingSchedule
    from loka.probe.probe import Probe
    from loka.models.workload import ranker_workload

    probed = copy.deepcopy(trained[0])
    wl = ranker_workload("tiny", batch_size=128, seed=3)
    cfg = ProbeConfig(schedule=SamplingSchedule(every=1, max_samples=2), candidates=("rowwise",),
                      min_samples=2, max_rows=64, fit_values=64, stats=False)  # fmt: skip
    probe = Probe(probed, cfg)
    for step in range(2):
        with probe.step(step):
            wl.loss_fn(probe.select(probed), wl.make_batch(step)).backward()
    return plan(probe.report(model="tiny"), Budget(), progress=False)


def test_loka_plan_passes(trained, loka_plan):
    model, stream, baseline = trained
    candidate = copy.deepcopy(model)
    converted = loka.convert(candidate, plan=loka_plan).converted
    outputs = evaluate(candidate, stream, n_examples=EVAL_EXAMPLES).outputs
    result = gate(baseline, outputs, **FAST)
    # on CPU the plan keeps every GEMM in bf16: the same predictions, which the gate names as such
    expected = "pass" if converted else "identical"
    assert result.exit_code == 0 and result.verdict == expected, result.table() + "\n" + loka_plan.summary()


def test_e5m2_without_scaling_is_not_passed(trained):
    model, stream, baseline = trained
    outputs = evaluate(_e5m2_forward(model, 1.0), stream, n_examples=EVAL_EXAMPLES).outputs
    result = gate(baseline, outputs, **FAST)
    assert result.exit_code == 1, result.table()
    assert any(c.name.startswith("ne[") and c.verdict in ("regression", "inconclusive") for c in result.checks)


def test_mis_scaled_e5m2_is_a_regression(trained):
    model, stream, baseline = trained
    outputs = evaluate(_e5m2_forward(model, 2.0**20), stream, n_examples=EVAL_EXAMPLES).outputs
    result = gate(baseline, outputs, **FAST)
    ne_ctr = next(c for c in result.checks if c.name == "ne[ctr]")
    assert ne_ctr.verdict == "regression" and result.exit_code == 1, result.table()
    with pytest.raises(AssertionError, match="REGRESSION"):
        loka.gate.testing.assert_no_regression(baseline, outputs, **FAST)


def test_cli_checkpoint_with_plan_file_passes(trained, loka_plan, tmp_path, capsys):
    """``loka gate`` on a checkpoint: bf16 against the same checkpoint converted by a plan JSON."""
    from loka.app.cli import main
    from loka.models.checkpoint import save_checkpoint

    model, _, _ = trained
    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", model, train_config={"eval_seed": 1_000_003, "teacher_seed": 0})
    plan_path = loka_plan.save(tmp_path / "plan.json")
    argv = ["gate", "--baseline", str(ckpt), "--baseline-precision", "bf16", "--candidate", str(ckpt),
            "--candidate-precision", str(plan_path), "--eval-examples", str(EVAL_EXAMPLES), "--n-boot", "400",
            "--json", str(tmp_path / "gate.json")]  # fmt: skip
    code = main(argv)  # the loka command wires loka.models' checkpoint evaluation into the gate
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert f"[{plan_path}]" in out.out and ("loka gate: PASS" in out.out or "loka gate: IDENTICAL" in out.out)

