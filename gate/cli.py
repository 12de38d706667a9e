"""``loka gate``: compare a candidate against a baseline; exit 0 pass, 1 regression, 2 bad input.

    loka gate --baseline bf16.npz --candidate fp8.npz [--budget-ne 0.0002] \\
              [--report-baseline probe_a.json --report-candidate probe_b.json] [--json result.json]
    loka gate --baseline bf16_seed1.npz bf16_seed2.npz --candidate fp8_seed1.npz fp8_seed2.npz   # replicates
    loka gate --paired --baseline bf16_s1.npz bf16_s2.npz --candidate fp8_s1.npz fp8_s2.npz      # pairs share seeds
    loka gate --baseline run/checkpoint.pt --baseline-plan bf16 \\
              --candidate run/checkpoint.pt --candidate-plan plan.json --eval-examples 100000

A thin layer over :func:`loka.gate.gate`: every bad input (missing file, different
models, different eval sets, bad budget) becomes one clear line on stderr and exit
code 2, never a traceback. The gate reads saved EvalOutputs (``.npz``); ranker
checkpoints (``.pt``) are scored by the ``checkpoint_loader`` that ``loka.app.cli`` wires
in from ``loka.models`` (without it, a checkpoint is refused with that reason).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Callable

from loka.cli_vocab import add_alias
from loka.gate.budget import DEFAULT_NE_BUDGET, GateBudget
from loka.gate.compare import GateInputError, gate, load_input
from loka.gate.replicates import gate_replicates
from loka.gate.result import EXIT_ERROR
from loka.gate.sites import error_entries


# checkpoint_loader(side, path, precision, *, eval_examples, eval_seed, device) -> EvalOutputs
CheckpointLoader = Callable[..., object]


def register(subparsers, *, checkpoint_loader: CheckpointLoader | None = None) -> None:
    """Add ``loka gate``; ``checkpoint_loader`` scores ``.pt`` checkpoint sides (``loka.app.cli`` gives loka.models')."""
    p = subparsers.add_parser(
        "gate",
        help="fail CI when a candidate (FP8 plan, kernel, model version) loses quality",
        description=(
            "Compare a candidate against a baseline on the same held-out examples: paired bootstrap "
            "intervals of NE, AUC and calibration per task, and per-site FP8 error from probe reports. "
            "Exit 0 pass, 1 regression (or inconclusive), 2 could not evaluate."
        ),
    )
    p.add_argument("--baseline", required=True, nargs="+",
                   help="saved evaluation outputs (.npz from EvalOutputs.save) or a ranker checkpoint; several "
                        "(runs with other seeds / data orders) for replicate mode")  # fmt: skip
    p.add_argument("--candidate", required=True, nargs="+",
                   help="saved evaluation outputs or a ranker checkpoint; several for replicate mode: a model "
                        "trained in FP8 vs one trained in bf16, with between-run variance in the decision")  # fmt: skip
    p.add_argument("--paired", action="store_true",
                   help="replicate mode: baseline run j and candidate run j share data order and initialisation "
                        "(same seed); gate the per-pair NE differences (far narrower than unpaired runs)")  # fmt: skip
    p.add_argument("--baseline-plan", dest="baseline_precision", default=None,
                   help="checkpoint only: bf16, fp32, fp8 or a plan JSON (default: as trained)")  # fmt: skip
    p.add_argument("--candidate-plan", dest="candidate_precision", default=None,
                   help="checkpoint only: bf16, fp32, fp8 or a plan JSON (default: as trained)")  # fmt: skip
    for side in ("baseline", "candidate"):  # the old names of --baseline-plan / --candidate-plan
        add_alias(p, f"--{side}-precision", f"--{side}-plan")
    p.add_argument("--eval-examples", type=int, default=50_000,
                   help="checkpoint only: held-out examples to score (default 50000)")  # fmt: skip
    p.add_argument("--eval-seed", type=int, default=None,
                   help="checkpoint only: held-out stream seed (default: the checkpoint's eval_seed)")  # fmt: skip
    p.add_argument("--device", default="auto",
                   help="checkpoint only: device to evaluate on (default auto: cuda if available, else cpu)")
    p.add_argument("--budget-ne", type=float, default=DEFAULT_NE_BUDGET,
                   help="max relative NE increase (default 0.0002 = 0.02%%)")  # fmt: skip
    p.add_argument("--budget-auc", type=float, default=None, help="max absolute AUC drop (default: report only)")
    p.add_argument("--budget-calibration", type=float, default=None,
                   help="max absolute calibration change (default: report only)")  # fmt: skip
    p.add_argument("--budget-site-error", type=float, default=None,
                   help="relative GEMM error budget per probe site (default: each report entry's threshold)")  # fmt: skip
    p.add_argument("--report-baseline", default=None, help="probe report JSON of the baseline")
    p.add_argument("--report-candidate", default=None, help="probe report JSON of the candidate")
    p.add_argument("--tasks", default="", help="comma-separated tasks to gate (default: all)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0: reruns agree)")
    p.add_argument("--allow-inconclusive", action="store_true", help="exit 0 when an interval straddles a budget")
    p.add_argument("--allow-different-models", action="store_true",
                   help="compare outputs whose meta 'model' differs")  # fmt: skip
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON to PATH")
    p.add_argument("--out", dest="save_outputs", default=None, metavar="DIR",
                   help="write both sides' EvalOutputs to DIR/baseline.npz and DIR/candidate.npz "
                        "(reuse an evaluated checkpoint as --baseline next time)")  # fmt: skip
    add_alias(p, "--save-outputs", "--out")
    p.set_defaults(func=run, checkpoint_loader=checkpoint_loader)


def _error(message: str) -> int:
    one_line = " ".join(message.split())  # a multi-line reason (a plan's differences) stays one line
    print(f"loka gate: could not evaluate: {one_line}", file=sys.stderr)
    return EXIT_ERROR


def _check_reports(baseline_report: str | None, candidate_report: str | None) -> None:
    if (baseline_report is None) != (candidate_report is None):
        raise ValueError("give both probe reports (--report-baseline and --report-candidate) or neither")
    for report in (baseline_report, candidate_report):
        if report is not None:
            error_entries(report)  # raises ReportError (a ValueError) saying what is wrong


def _save_outputs(out_dir: str, base, cand) -> None:
    os.makedirs(out_dir, exist_ok=True)
    base.save(os.path.join(out_dir, "baseline.npz"))
    cand.save(os.path.join(out_dir, "candidate.npz"))


def _side(args: argparse.Namespace, side: str, path: str, precision: str | None):
    """(EvalOutputs, display name): a ``.pt`` checkpoint through the wired loader, else saved outputs."""
    loader = getattr(args, "checkpoint_loader", None)
    if path.endswith(".pt"):
        if loader is None:
            raise GateInputError(f"{side}: {path} is a checkpoint; the gate reads saved EvalOutputs (.npz) and scores "
                                 "checkpoints only through loka.models (run `loka gate` from the loka command)")
        try:
            outputs = loader(side, path, precision, eval_examples=args.eval_examples, eval_seed=args.eval_seed,
                             device=args.device)
        except ValueError as exc:
            raise GateInputError(f"{side}: {exc}") from None
        return outputs, path + (f" [{precision}]" if precision else "")
    if precision is not None:
        raise GateInputError(f"{side}: --{side}-precision applies to checkpoints (.pt), not to saved outputs {path}")
    return load_input(side, path)


def run(args: argparse.Namespace) -> int:
    try:
        budget = GateBudget(
            ne_rel=args.budget_ne,
            auc_abs=args.budget_auc,
            calibration_abs=args.budget_calibration,
            site_error=args.budget_site_error,
            confidence=args.confidence,
            n_boot=args.n_boot,
            seed=args.seed,
            tasks=tuple(t for t in args.tasks.split(",") if t),
            inconclusive_passes=args.allow_inconclusive,
        )
        _check_reports(args.report_baseline, args.report_candidate)  # before any slow evaluation
        if len(args.baseline) > 1 or len(args.candidate) > 1:
            return _run_replicates(args, budget)
        if args.paired:
            raise ValueError("--paired pairs several runs a side (baseline j with candidate j); give 2 or more "
                             "to --baseline and --candidate, or drop --paired for one pair of outputs")
        base, base_name = _side(args, "baseline", args.baseline[0], args.baseline_precision)
        cand, cand_name = _side(args, "candidate", args.candidate[0], args.candidate_precision)
        if args.save_outputs:
            _save_outputs(args.save_outputs, base, cand)
        result = gate(
            base,
            cand,
            budget,
            baseline_report=args.report_baseline,
            candidate_report=args.report_candidate,
            allow_different_models=args.allow_different_models,
        )
    except (GateInputError, ValueError, OSError) as exc:
        if getattr(args, "debug", False):
            raise  # --debug: the traceback
        return _error(str(exc))
    result = replace(result, baseline=base_name, candidate=cand_name)
    return _print_result(result, args.json)


def _print_result(result, json_path: str | None) -> int:
    print(result.table())
    if json_path:
        try:
            with open(json_path, "w") as f:
                f.write(result.to_json())
        except OSError as exc:
            return _error(f"cannot write {json_path}: {exc}")
    return result.exit_code


def _run_replicates(args: argparse.Namespace, budget: GateBudget) -> int:
    """Replicate mode (loka.gate.replicates): several runs a side, between-run variance included."""
    if args.report_baseline or args.report_candidate or args.save_outputs:
        raise ValueError("replicate mode gates NE over runs; drop --report-* and --save-outputs (they compare one pair)")
    base = [_side(args, "baseline", b, args.baseline_precision)[0] for b in args.baseline]
    cand = [_side(args, "candidate", c, args.candidate_precision)[0] for c in args.candidate]
    return _print_result(gate_replicates(base, cand, budget, paired=args.paired), args.json)
