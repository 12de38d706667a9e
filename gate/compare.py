"""``gate(baseline, candidate)``: the Python API behind ``loka gate`` and the pytest helper.

Both sides must have scored the *same* held-out examples with the same labels (checked
through the eval fingerprint; a different order is realigned by example id) and come
from the same model architecture (``meta["model"]``). Anything else is a bad input:
``GateInputError`` with the reason, which the CLI turns into exit code 2.

Per task it runs paired bootstraps (``loka.gate.stats``) of NE (relative change, gated
by ``GateBudget.ne_rel``), AUC and calibration (gated only when given a budget), and,
when both probe reports are given, the per-site FP8 error checks of ``loka.gate.sites``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np

from loka.gate.budget import GateBudget
from loka.gate.outputs import EvalOutputs, EvalOutputsError, is_eval_outputs_file
from loka.gate.result import INFO, Check, GateResult, classify_lower, classify_upper
from loka.gate.replicates import gate_replicates
from loka.gate.sites import ReportError, site_checks
from loka.gate.stats import BootstrapResult, paired_bootstrap


class GateInputError(ValueError):
    """The two sides cannot be compared (missing file, different models or eval sets)."""


def load_input(side: str, value: object) -> tuple[EvalOutputs, str]:
    """(EvalOutputs, display name) of one side: EvalOutputs, or a file written by ``EvalOutputs.save``.

    The gate reads that one format. A ranker checkpoint is evaluated to EvalOutputs one
    layer up, by ``loka.models.gate_inputs`` (which ``loka gate`` wires in).
    """
    name = os.fspath(value) if isinstance(value, (str, os.PathLike)) else side
    try:
        return read_outputs(side, value), name
    except (EvalOutputsError, ValueError) as exc:
        raise GateInputError(f"{side}: {exc}") from None


def read_outputs(side: str, value: object) -> EvalOutputs:
    """``value`` as EvalOutputs: itself, or the saved file it names; EvalOutputsError for anything else."""
    if isinstance(value, EvalOutputs):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise EvalOutputsError(f"{side} must be EvalOutputs or a path, not {type(value).__name__}")
    if not os.path.isfile(value):
        raise EvalOutputsError(f"{value}: no such file")
    if not is_eval_outputs_file(value) and not os.fspath(value).endswith(".npz"):
        raise EvalOutputsError(f"{value}: not saved EvalOutputs (.npz from EvalOutputs.save), the format the gate "
                               "reads; evaluate a ranker checkpoint (.pt) through loka.models (`loka gate` does)")
    return EvalOutputs.load(value)


def _check_same_model(base: EvalOutputs, cand: EvalOutputs, allow_different_models: bool) -> None:
    model_a, model_b = base.meta.get("model") or "", cand.meta.get("model") or ""
    if model_a and model_b and model_a != model_b and not allow_different_models:
        raise GateInputError(
            f"baseline and candidate are different models ({_model_difference(model_a, model_b)}); the gate "
            "compares versions of one model. Pass allow_different_models=True / --allow-different-models "
            "to compare anyway."
        )


def _model_difference(model_a: str, model_b: str) -> str:
    """The differing fields when both are JSON configs (as the ranker writes), else both names."""
    try:
        cfg_a, cfg_b = json.loads(model_a), json.loads(model_b)
    except (TypeError, ValueError):
        cfg_a = cfg_b = None
    if isinstance(cfg_a, dict) and isinstance(cfg_b, dict):
        keys = sorted(k for k in set(cfg_a) | set(cfg_b) if cfg_a.get(k) != cfg_b.get(k))
        return ", ".join(f"{k}: {cfg_a.get(k)!r} vs {cfg_b.get(k)!r}" for k in keys[:5])
    return f"{model_a[:80]!r} vs {model_b[:80]!r}"


def _describe_set_difference(base: EvalOutputs, cand: EvalOutputs) -> str:
    only_a = np.setdiff1d(base.example_ids, cand.example_ids).size
    only_b = np.setdiff1d(cand.example_ids, base.example_ids).size
    if only_a or only_b:
        return (
            f"the eval sets differ: {only_a} examples only in the baseline, {only_b} only in the candidate "
            f"(of {base.n} and {cand.n}); evaluate both on the same held-out examples"
        )
    if base.tasks != cand.tasks:
        return f"the tasks differ: baseline has {list(base.tasks)}, candidate {list(cand.tasks)}"
    cand = cand.aligned_to(base.example_ids)
    bad = [t for t in base.tasks if not np.array_equal(base.labels[t], cand.labels[t])]
    if not bad:
        return (f"the example weights differ (weighted tasks: baseline {sorted(base.weights)}, candidate "
                f"{sorted(cand.weights)}); weight both sides' held-out examples alike")
    n_bad = int(sum((base.labels[t] != cand.labels[t]).sum() for t in bad))
    return f"the labels differ on {n_bad} examples (tasks {bad}); both sides must use the same held-out labels"


def _aligned(base: EvalOutputs, cand: EvalOutputs) -> EvalOutputs:
    if base.eval_fingerprint != cand.eval_fingerprint:
        raise GateInputError(_describe_set_difference(base, cand))
    return cand.aligned_to(base.example_ids)


def _ne_check(task: str, r: BootstrapResult, budget: GateBudget) -> Check:
    verdict, needed = classify_upper(r.n, r.rel_diff, r.rel_ci_lo, r.rel_ci_hi, budget.ne_rel)
    return Check(
        name=f"ne[{task}]", kind="model", baseline=r.value_a, candidate=r.value_b, estimate=r.rel_diff,
        ci_lo=r.rel_ci_lo, ci_hi=r.rel_ci_hi, budget=f"<= +{budget.ne_rel * 100:.4f}%", verdict=verdict,
        n=r.n, n_needed=needed, relative=True,
    )  # fmt: skip


def _auc_check(task: str, r: BootstrapResult, budget: GateBudget) -> Check:
    if budget.auc_abs is None:
        verdict, needed, rule = INFO, None, "(report)"
    else:
        verdict, needed = classify_lower(r.n, r.diff, r.ci_lo, r.ci_hi, -budget.auc_abs)
        rule = f">= -{budget.auc_abs:.3g}"
    return Check(
        name=f"auc[{task}]", kind="model", baseline=r.value_a, candidate=r.value_b, estimate=r.diff,
        ci_lo=r.ci_lo, ci_hi=r.ci_hi, budget=rule, verdict=verdict, n=r.n, n_needed=needed,
    )  # fmt: skip


def _calibration_check(task: str, r: BootstrapResult, budget: GateBudget) -> Check:
    if budget.calibration_abs is None:
        verdict, needed, rule = INFO, None, "(report)"
    else:
        # two-sided: the change must stay within +-budget
        b = budget.calibration_abs
        up = classify_upper(r.n, r.diff, r.ci_lo, r.ci_hi, b)
        down = classify_lower(r.n, r.diff, r.ci_lo, r.ci_hi, -b)
        worst = next((v for v in (up, down) if v[0] == "regression"), None)
        worst = worst or next((v for v in (up, down) if v[0] == "inconclusive"), up)
        verdict, needed, rule = worst[0], worst[1], f"within +-{b:.3g}"
    return Check(
        name=f"calibration[{task}]", kind="model", baseline=r.value_a, candidate=r.value_b, estimate=r.diff,
        ci_lo=r.ci_lo, ci_hi=r.ci_hi, budget=rule, verdict=verdict, n=r.n, n_needed=needed,
    )  # fmt: skip


def _tasks(base: EvalOutputs, budget: GateBudget) -> tuple[str, ...]:
    if not budget.tasks:
        return base.tasks
    unknown = [t for t in budget.tasks if t not in base.tasks]
    if unknown:
        raise GateInputError(f"tasks {unknown} are not in the outputs; they have {list(base.tasks)}")
    return tuple(budget.tasks)


def _model_checks(base: EvalOutputs, cand: EvalOutputs, budget: GateBudget) -> list[Check]:
    checks = []
    for k, task in enumerate(_tasks(base, budget)):
        y, pa, pb = base.labels[task], base.probs[task], cand.probs[task]
        seed = None if budget.seed is None else budget.seed + 7919 * k
        boot = dict(n_boot=budget.n_boot, seed=seed, confidence=budget.confidence, weights=base.weights.get(task))
        try:
            checks.append(_ne_check(task, paired_bootstrap(y, pa, pb, "ne", **boot), budget))
            checks.append(_auc_check(task, paired_bootstrap(y, pa, pb, "auc", **boot), budget))
            checks.append(_calibration_check(task, paired_bootstrap(y, pa, pb, "calibration", **boot), budget))
        except ValueError as exc:  # e.g. a task with a single class in this eval set
            raise GateInputError(
                f"task {task!r}: {exc} (gate the other tasks with GateBudget.tasks / --tasks)"
            ) from None
    return checks


def _site_results(baseline_report: object, candidate_report: object, budget: GateBudget) -> tuple[list, list]:
    if (baseline_report is None) != (candidate_report is None):
        raise GateInputError("give both probe reports (baseline and candidate) or neither")
    if baseline_report is None:
        return [], []
    try:
        return site_checks(baseline_report, candidate_report, budget)
    except ReportError as exc:
        raise GateInputError(str(exc)) from None


def _gate_runs(baseline: object, candidate: object, budget: GateBudget, paired: bool, reports: object) -> GateResult:
    """Replicate mode from ``gate``: a list of runs a side (one alone is the paired gate's question)."""
    if not (isinstance(baseline, (list, tuple)) and isinstance(candidate, (list, tuple))):
        raise GateInputError("give a list of runs on both sides (replicate mode) or one output on each")
    if reports:
        raise GateInputError("replicate mode gates NE over runs; probe reports compare one pair: drop them")
    base = [load_input(f"baseline {k}", b)[0] for k, b in enumerate(baseline)]
    cand = [load_input(f"candidate {k}", c)[0] for k, c in enumerate(candidate)]
    try:
        return gate_replicates(base, cand, budget, paired=paired)
    except ValueError as exc:
        raise GateInputError(str(exc)) from None


def gate(
    baseline: EvalOutputs | str | os.PathLike,
    candidate: EvalOutputs | str | os.PathLike,
    budget: GateBudget | None = None,
    *,
    baseline_report: object = None,
    candidate_report: object = None,
    allow_different_models: bool = False,
    paired: bool = False,
    **budget_fields,
) -> GateResult:
    """Compare ``candidate`` against ``baseline`` on the same examples; see the module docstring.

    ``baseline``/``candidate``: EvalOutputs or saved EvalOutputs paths (``.npz``). The gate
    never builds a model: a ranker checkpoint is scored first by ``loka.models.gate_inputs``
    (``gate_checkpoints`` there runs both and calls this).

    ``budget_fields`` override fields of ``budget`` (e.g. ``ne_rel=0.001``). Reports are
    probe reports (path, dict or ProbeReport), both or neither. Raises GateInputError
    when the two cannot be compared.

    Lists of runs on both sides are replicate mode (``loka.gate.replicates``;
    ``paired=True`` when run j of each side shares its seed and data order).
    """
    try:
        budget = replace(budget or GateBudget(), **budget_fields)
    except TypeError as exc:
        raise GateInputError(f"unknown budget field: {exc}") from None
    if isinstance(baseline, (list, tuple)) or isinstance(candidate, (list, tuple)):
        return _gate_runs(baseline, candidate, budget, paired, baseline_report or candidate_report)
    if paired:
        raise GateInputError("paired=True pairs lists of runs (baseline j with candidate j); pass a list a side")
    # the cheap checks first, so a bad report fails before a checkpoint is evaluated
    site_results, notes = _site_results(baseline_report, candidate_report, budget)
    base, base_name = load_input("baseline", baseline)
    cand, cand_name = load_input("candidate", candidate)
    _check_same_model(base, cand, allow_different_models)
    cand = _aligned(base, cand)
    checks = _model_checks(base, cand, budget) + site_results
    fp_a, fp_b = base.meta.get("model_fingerprint"), cand.meta.get("model_fingerprint")
    if fp_a and fp_a == fp_b:
        notes.insert(0, f"baseline and candidate have the same model fingerprint {fp_a}: is this the same model?")
    identical = all(np.array_equal(base.probs[t], cand.probs[t]) for t in _tasks(base, budget))
    return GateResult(
        checks=tuple(checks), n_examples=base.n, confidence=budget.confidence, n_boot=budget.n_boot,
        baseline=base_name, candidate=cand_name, inconclusive_passes=budget.inconclusive_passes, notes=tuple(notes),
        identical_predictions=identical,
    )  # fmt: skip
