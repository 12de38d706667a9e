"""The gate's answer: one ``Check`` per metric or site, a verdict, a table and a JSON dict.

A check compares an interval with a budget:

- ``pass``: the whole interval is on the good side of the budget;
- ``regression``: the whole interval is on the bad side;
- ``inconclusive``: the interval straddles the budget; ``n_needed`` says how many
  examples (or probe samples, for sites) would shrink it enough to decide, from the
  interval's half-width scaling as 1/sqrt(n);
- ``info``: measured and reported, no budget given.

When the two sides predicted exactly the same probabilities on every example (the same
model, or a plan that converted nothing), there is no change to judge: the result's
verdict is ``identical`` (exit 0, nothing was lost) and its table says so instead of
printing a PASS over intervals of +0.0000%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from loka.jsonio import dumps

Verdict = Literal["pass", "regression", "inconclusive", "info", "identical"]
PASS, REGRESSION, INCONCLUSIVE, INFO, IDENTICAL = "pass", "regression", "inconclusive", "info", "identical"
EXIT_PASS, EXIT_REGRESSION, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Check:
    """One compared quantity. ``estimate``/``ci_*`` are the candidate-minus-baseline change
    (relative for NE, absolute otherwise; for sites the candidate's error itself).
    ``n`` / ``n_needed`` count examples, probe samples (sites) or runs (``unit``,
    e.g. " pairs" for paired replicates)."""

    name: str
    kind: Literal["model", "site"]
    baseline: float
    candidate: float
    estimate: float
    ci_lo: float
    ci_hi: float
    budget: str  # human form of the rule, e.g. "<= +0.0200%"
    verdict: Verdict
    n: int
    n_needed: int | None = None
    relative: bool = False
    note: str = ""
    unit: str = ""  # what n counts when not examples: " probe samples", " pairs", " runs a side"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def n_needed(n: int, estimate: float, ci_lo: float, ci_hi: float, bound: float) -> int | None:
    """Examples needed for [ci_lo, ci_hi] (around ``estimate``) to exclude ``bound``.

    The side of the interval facing the bound must shrink to the gap between estimate and
    bound; half-widths scale as 1/sqrt(n). None when the estimate sits on the bound.
    """
    gap = abs(bound - estimate)
    half = (ci_hi - estimate) if estimate < bound else (estimate - ci_lo)
    if gap == 0.0 or not math.isfinite(half) or n <= 0:
        return None
    return int(math.ceil(n * (half / gap) ** 2))


def classify_upper(n: int, estimate: float, ci_lo: float, ci_hi: float, bound: float) -> tuple[str, int | None]:
    """Verdict when the quantity must stay <= bound."""
    if ci_hi <= bound:
        return PASS, None
    if ci_lo > bound:
        return REGRESSION, None
    return INCONCLUSIVE, n_needed(n, estimate, ci_lo, ci_hi, bound)


def classify_lower(n: int, estimate: float, ci_lo: float, ci_hi: float, bound: float) -> tuple[str, int | None]:
    """Verdict when the quantity must stay >= bound."""
    verdict, _ = classify_upper(n, -estimate, -ci_hi, -ci_lo, -bound)
    return verdict, (n_needed(n, -estimate, -ci_hi, -ci_lo, -bound) if verdict == INCONCLUSIVE else None)


@dataclass(frozen=True)
class GateResult:
    """All checks of one baseline/candidate comparison."""

    checks: tuple[Check, ...]
    n_examples: int
    confidence: float
    n_boot: int
    baseline: str
    candidate: str
    inconclusive_passes: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    identical_predictions: bool = False  # both sides predicted the same probabilities everywhere

    @property
    def verdict(self) -> Verdict:
        verdicts = {c.verdict for c in self.checks}
        if REGRESSION in verdicts:
            return REGRESSION
        if self.identical_predictions:
            return IDENTICAL
        if INCONCLUSIVE in verdicts:
            return INCONCLUSIVE
        return PASS

    @property
    def exit_code(self) -> int:
        if self.verdict == REGRESSION:
            return EXIT_REGRESSION
        if self.verdict == INCONCLUSIVE and not self.inconclusive_passes:
            return EXIT_REGRESSION
        return EXIT_PASS

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.verdict in (REGRESSION, INCONCLUSIVE))

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "baseline": self.baseline,
            "candidate": self.candidate,
            "n_examples": self.n_examples,
            "confidence": self.confidence,
            "n_boot": self.n_boot,
            "inconclusive_passes": self.inconclusive_passes,
            "identical_predictions": self.identical_predictions,
            "notes": list(self.notes),
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON (non-finite floats written as "inf" / "-inf" / "nan")."""
        return dumps(self.to_dict(), indent=indent)

    def _method(self) -> str:
        if any(c.unit in _RUN_UNITS for c in self.checks):
            return "t-interval over runs with the eval-set bootstrap,"
        return "paired bootstrap"

    def _advice(self) -> str:
        """What would decide the inconclusive checks: more examples, probe samples, runs or pairs."""
        undecided = [c for c in self.checks if c.verdict == INCONCLUSIVE]
        # a replicate check without a count is limited by the eval set: more examples, not more runs
        units = {(c.unit if c.n_needed or c.unit not in _RUN_UNITS else "") or (" probe samples" if c.kind == "site"
                 else "") for c in undecided}
        more = {"": "evaluate on more examples", " probe samples": "probe more samples",
                " pairs": "train more baseline/candidate pairs (same seed and data order within a pair)",
                " runs a side": "train more runs a side (or pair the runs: --paired)"}
        see = " (see 'need n=')" if any(c.n_needed for c in undecided) else ""
        return "; ".join(more.get(u, f"add{u}") for u in sorted(units)) + see

    def table(self) -> str:
        """Readable summary: one row per check with its interval, budget and verdict."""
        pct = round(self.confidence * 100)
        head = (
            f"loka gate: {self.verdict.upper()}  baseline={self.baseline}  candidate={self.candidate}  "
            f"({self.n_examples} examples, {self._method()} {pct}% CI, {self.n_boot} resamples)"
        )
        if self.verdict == IDENTICAL:
            return "\n".join([head, "", _IDENTICAL_TEXT.format(n=self.n_examples)] + [f"note: {n}" for n in self.notes])
        rows = [("check", "baseline", "candidate", "change", f"{pct}% CI", "budget", "verdict")]
        quiet_sites = [c for c in self.checks if c.kind == "site" and c.verdict in (PASS, INFO)]
        quiet_ids = {id(c) for c in quiet_sites}
        for c in self.checks:
            if id(c) in quiet_ids:
                continue
            rows.append(
                (
                    c.name,
                    _num(c.baseline),
                    _num(c.candidate),
                    _delta(c.estimate, c),
                    f"[{_delta(c.ci_lo, c)}, {_delta(c.ci_hi, c)}]",
                    c.budget,
                    _verdict_text(c),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, ""] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        if quiet_sites:
            n_info = sum(c.verdict == INFO for c in quiet_sites)
            lines.append(
                f"sites: {len(quiet_sites) - n_info} error entries within budget, {n_info} over budget "
                "in the baseline too (not a change); all are in the JSON result"
            )
        lines += [f"note: {n}" for n in self.notes]
        if self.verdict == INCONCLUSIVE:
            lines.append(
                f"inconclusive: an interval straddles its budget; {self._advice()} "
                "or accept with inconclusive_passes / --allow-inconclusive."
            )
        return "\n".join(lines)


_RUN_UNITS = (" pairs", " runs a side")
_IDENTICAL_TEXT = (
    "no verdict: baseline and candidate predicted identical probabilities on all {n} examples, so there is "
    "no change to gate. Are they the same model? (A plan that keeps every site in bf16 converts nothing; "
    "check the candidate is the model you meant to test.)"
)


def _num(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def _delta(v: float, c: Check) -> str:
    if c.kind == "site":  # a site row shows the candidate's error itself, not a change
        return f"{v:.3g}"
    if not math.isfinite(v):
        return f"{v:+}"
    return f"{v * 100:+.4f}%" if c.relative else f"{v:+.3g}"


def _verdict_text(c: Check) -> str:
    text = c.verdict.upper() if c.verdict in (REGRESSION, INCONCLUSIVE) else c.verdict
    if c.verdict == INCONCLUSIVE:
        unit = c.unit or (" probe samples" if c.kind == "site" else "")
        text += f" (need n={c.n_needed}{unit})" if c.n_needed else ("" if c.note else " (estimate on the budget)")
    if c.note:
        text += f" [{c.note}]"
    return text
