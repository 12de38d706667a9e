"""gate(): verdicts on synthetic pairs with known quality differences, and input checks."""

from __future__ import annotations

import numpy as np
import pytest

from loka.gate import EvalOutputs, GateBudget, GateInputError, gate
from loka.gate.result import classify_lower, classify_upper, n_needed

from .helpers import synthetic_pair

FAST = {"n_boot": 300}  # fewer resamples keep the suite quick; verdicts are far from the edges


def test_clear_regression_is_caught():
    a, b = synthetic_pair(noise=0.3)
    r = gate(a, b)
    ne = next(c for c in r.checks if c.name == "ne[click]")
    assert ne.verdict == "regression" and ne.ci_lo > 0.0002
    assert r.verdict == "regression" and r.exit_code == 1
    assert "REGRESSION" in r.table() and "ne[click]" in r.table()


def test_tiny_change_passes():
    a, b = synthetic_pair(noise=0.002)
    r = gate(a, b)
    assert r.verdict == "pass" and r.exit_code == 0, r.table()
    # AUC and calibration are measured and reported, but gate nothing without a budget
    assert {c.verdict for c in r.checks if not c.name.startswith("ne")} == {"info"}


def test_identical_outputs_say_so_instead_of_a_verdict():
    """A plan that converts nothing used to print PASS "+0.0000% [+0.0000%, +0.0000%]"."""
    a, b = synthetic_pair(n=3000)
    r = gate(a, a)
    assert r.verdict == "identical" and r.exit_code == 0 and any("same model fingerprint" in n for n in r.notes)
    table = r.table()
    assert "IDENTICAL" in table and "identical probabilities on all 3000 examples" in table
    assert "PASS" not in table and "+0.0000%" not in table
    assert r.to_dict()["identical_predictions"] is True
    # other weights, same predictions (e.g. a bf16 plan and a plan that converted nothing)
    same = EvalOutputs.build(b.example_ids, b.labels, a.probs, model="ranker-a", model_fingerprint="other")
    assert gate(a, same).verdict == "identical"
    # one example differs: a real comparison again
    probs = a.probs["click"].copy()
    probs[7] = min(probs[7] * 1.001, 1.0)
    near = EvalOutputs.build(a.example_ids, a.labels, {"click": probs}, model="ranker-a")
    assert gate(a, near).verdict == "pass"


def test_budget_on_the_estimate_is_inconclusive_with_examples_needed():
    for _ in range(20):  # a budget is >= 0: redraw the rare pair whose estimate sits that far below 0
        a, b = synthetic_pair(n=5000, noise=0.1)
        ne = gate(a, b).checks[0]
        half = ne.ci_hi - ne.estimate
        if ne.estimate + 0.5 * half > 0:
            break
    r = gate(a, b, ne_rel=ne.estimate + 0.5 * half)
    c = r.checks[0]
    assert c.verdict == "inconclusive" and r.verdict == "inconclusive" and r.exit_code == 1
    assert c.n_needed == pytest.approx(4 * a.n, rel=0.02)  # half-width must halve: 4x examples
    assert "need n=" in r.table()
    assert gate(a, b, ne_rel=ne.estimate + 0.5 * half, inconclusive_passes=True).exit_code == 0


def test_interval_shrinks_as_one_over_sqrt_n():
    """The premise of n_needed: 4x the examples halves the interval."""
    rng = np.random.default_rng(np.random.randint(2**31))
    a, b = synthetic_pair(n=20_000, noise=0.1, rng=rng)
    small = gate(_subset(a, 5000), _subset(b, 5000)).checks[0]
    full = gate(a, b).checks[0]
    ratio = (small.ci_hi - small.ci_lo) / (full.ci_hi - full.ci_lo)
    assert 1.6 < ratio < 2.5


def _subset(o: EvalOutputs, k: int) -> EvalOutputs:
    return EvalOutputs(o.example_ids[:k], {t: v[:k] for t, v in o.labels.items()},
                       {t: v[:k] for t, v in o.probs.items()}, o.meta)  # fmt: skip


def test_auc_and_calibration_budgets_gate_when_given():
    a, b = synthetic_pair(n=4000, noise=0.5)
    r = gate(a, b, auc_abs=0.0001, calibration_abs=1e-6, **FAST)
    verdicts = {c.name: c.verdict for c in r.checks}
    assert verdicts["auc[click]"] == "regression"
    assert verdicts["calibration[click]"] in ("regression", "inconclusive")
    assert gate(a, b, auc_abs=0.5, calibration_abs=0.5, ne_rel=1.0, **FAST).verdict == "pass"


def test_multi_task_and_task_selection():
    a, b = synthetic_pair(n=3000, tasks=("click", "conversion"), noise=0.3)
    assert {c.name for c in gate(a, b, **FAST).checks} >= {"ne[click]", "ne[conversion]"}
    only = gate(a, b, tasks=("conversion",), **FAST)
    assert {c.name for c in only.checks} == {"ne[conversion]", "auc[conversion]", "calibration[conversion]"}
    with pytest.raises(GateInputError, match="not in the outputs"):
        gate(a, b, tasks=("purchase",))


def test_reordered_candidate_is_aligned_by_example_id():
    a, b = synthetic_pair(n=5000, noise=0.3)
    perm = np.random.default_rng(np.random.randint(2**31)).permutation(b.n)
    shuffled = EvalOutputs(b.example_ids[perm], {t: v[perm] for t, v in b.labels.items()},
                           {t: v[perm] for t, v in b.probs.items()}, b.meta)  # fmt: skip
    assert gate(a, shuffled, **FAST).checks[0].estimate == pytest.approx(gate(a, b, **FAST).checks[0].estimate, rel=1e-9)


def test_different_eval_sets_models_and_labels_are_bad_inputs():
    a, b = synthetic_pair(n=2000)
    other_ids = EvalOutputs(b.example_ids + 1, b.labels, b.probs, b.meta)
    with pytest.raises(GateInputError, match="eval sets differ"):
        gate(a, other_ids)
    flipped = {t: v.copy() for t, v in b.labels.items()}
    flipped["click"][:5] = 1.0 - flipped["click"][:5]
    with pytest.raises(GateInputError, match="labels differ on 5 examples"):
        gate(a, EvalOutputs(b.example_ids, flipped, b.probs, b.meta))
    other_model = EvalOutputs(b.example_ids, b.labels, b.probs, {**b.meta, "model": "ranker-b"})
    with pytest.raises(GateInputError, match="different models"):
        gate(a, other_model)
    assert gate(a, other_model, allow_different_models=True, **FAST).verdict == "identical"  # noise=0: the same predictions


def test_bad_budget_and_missing_file(tmp_path):
    a, b = synthetic_pair(n=2000)
    with pytest.raises(ValueError, match="ne_rel"):
        GateBudget(ne_rel=-1.0)
    with pytest.raises(ValueError, match="n_boot"):
        GateBudget(n_boot=10)
    with pytest.raises(GateInputError, match="unknown budget field"):
        gate(a, b, ne_budget=0.1)
    with pytest.raises(GateInputError, match="no such file"):
        gate(tmp_path / "nope.npz", b)


def test_classify_helpers():
    assert classify_upper(100, 0.0, -1.0, 0.5, 1.0) == ("pass", None)
    assert classify_upper(100, 2.0, 1.5, 2.5, 1.0) == ("regression", None)
    assert classify_upper(100, 0.5, 0.0, 1.5, 1.0) == ("inconclusive", 400)
    assert classify_lower(100, -0.5, -1.5, 0.0, -1.0) == ("inconclusive", 400)
    assert n_needed(100, 1.0, 0.0, 2.0, 1.0) is None


def test_task_without_positives_is_a_bad_input_that_names_the_way_out():
    a, b = synthetic_pair(n=2000, tasks=("click", "purchase"), noise=0.002)
    no_pos = {**a.labels, "purchase": np.zeros(a.n)}
    a2 = EvalOutputs(a.example_ids, no_pos, a.probs, a.meta)
    b2 = EvalOutputs(b.example_ids, no_pos, b.probs, b.meta)
    with pytest.raises(GateInputError, match=r"'purchase'.*one class.*--tasks"):
        gate(a2, b2, **FAST)
    assert gate(a2, b2, tasks=("click",), **FAST).verdict == "pass"
