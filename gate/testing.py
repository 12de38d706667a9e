"""Test helpers for model owners: gate quality inside your own pytest suite.

    from loka.gate.testing import assert_no_regression

    def test_fp8_plan_keeps_quality(tmp_path):
        baseline = evaluate_my_model(precision="bf16")      # -> loka.gate.EvalOutputs
        candidate = evaluate_my_model(plan="plan.json")
        assert_no_regression(baseline, candidate, ne_rel=0.0002)

On a regression (or an inconclusive interval, unless ``inconclusive_passes=True``) it
raises ``AssertionError`` whose message is the gate's table, so the CI log says what
failed, by how much, and with which interval.
"""

from __future__ import annotations

from loka.gate.budget import GateBudget
from loka.gate.compare import gate
from loka.gate.result import GateResult


def assert_no_regression(baseline, candidate, budget: GateBudget | None = None, **budget_fields) -> GateResult:
    """Run :func:`loka.gate.gate` and raise AssertionError (with the table) unless it passes.

    ``baseline``/``candidate``: EvalOutputs or paths of saved ones. Extra keywords are
    ``GateBudget`` fields (``ne_rel``, ``auc_abs``, ...) or ``gate`` options
    (``baseline_report``, ``candidate_report``, ``allow_different_models``).
    Returns the result so a test can inspect it further.
    """
    result = gate(baseline, candidate, budget, **budget_fields)
    if result.exit_code != 0:
        raise AssertionError("quality gate failed\n" + result.table())
    return result
