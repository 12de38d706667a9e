"""The gate for models *trained* in FP8: replicate runs, between-run variance included.

The paired gate (``loka.gate.compare``) answers "on these held-out examples, does this
candidate checkpoint score worse than this baseline checkpoint?": right for a fixed
checkpoint evaluated in FP8 vs bf16, where both sides share the trained weights. A
model *trained* in FP8 against one trained in bf16 differs also by run-to-run training
noise (seed, data order), which one pair cannot see: three data orders of one FP8
variant gave ΔNE +0.18%, -0.027%, +0.139% (sd 0.11%), each with a paired interval of
±0.01-0.02%, so a single pair's verdict flipped between PASS and REGRESSION by chance.

Replicate mode answers "does training this way change the NE a trained model reaches?".
It takes several baseline runs and several candidate runs (different seeds or data
orders, same held-out examples) and per task estimates

    Δ = mean_j NE(c_j) / mean_i NE(b_i) - 1

with a variance that adds the two sources:

- between runs: ``s_b² / n_b + s_c² / n_c`` from the spread of the runs' NE (Welch), the
  training noise a single pair hides;
- the eval set: a bootstrap over examples (the same resample scores every run), the
  noise of having scored these examples and not others.

The interval is ``Δ ± t(df) · se``, df from Welch-Satterthwaite: the between-run part's
(Welch's over the two sides) combined with the eval part's, which are effectively
infinite, so a small eval-set se is not inflated by the few runs' t quantile. It needs at least two runs per side:
with one, between-run variance cannot be estimated and the paired gate is the honest
answer to a narrower question.

Unpaired replicates are honest but rarely decisive: on public CTR models the between-run
sd of NE is 0.16-0.20%, so the interval is about 20x the 0.02% budget. **Paired
replicates** (``paired=True``, ``loka gate ... --paired``) remove most of it: when
baseline run j and candidate run j share their data order and initialisation (same
seed, only the precision differs), most of the training noise is common to the pair, so

    Δ = mean_j (NE(c_j) / NE(b_j) - 1)

with the between-pair variance ``s_d² / k`` of the per-pair differences (t with k - 1
degrees of freedom) plus the eval-set bootstrap of that same mean. An inconclusive
result says how many runs a side (or pairs) would decide it at the current spread, or
that the eval set, not the runs, is what limits it.
"""

from __future__ import annotations

import math

import numpy as np

from loka.gate.budget import GateBudget
from loka.gate.outputs import EvalOutputs
from loka.gate.result import INCONCLUSIVE, Check, GateResult, classify_upper
from loka.gate.stats import as_labels, as_probs, as_weights, check_probs_range, group_units, log_loss
from loka.gate.stats import resampled_sums
from loka.gate.stats import clip_eps, normalized_entropy


class ReplicateError(ValueError):
    """The runs cannot be compared as replicates (too few, different eval sets)."""


def replicate_ne(labels: object, runs_a: list, runs_b: list, *, paired: bool = False, weights: object = None,
                 n_boot: int = 1000, seed: int | None = 0, confidence: float = 0.95, max_units: int = 20_000) -> dict:
    """Relative NE change of runs_b over runs_a, with its interval (see the module docstring).

    ``labels``, ``weights`` [n]; ``runs_*``: lists of prediction arrays [n] on those examples
    (>= 2 each; with ``paired=True`` as many on each side, run j of each side a pair).
    Returns ``{estimate, ci_lo, ci_hi, se, se_runs, se_eval, df, df_runs, ne_a, ne_b, paired}``
    (relative quantities are fractions of the baseline NE).
    """
    _check_counts(len(runs_a), len(runs_b), paired)
    y = as_labels(labels)
    w = as_weights(weights, y.size)
    probs = [as_probs(p, y.size, f"run {k}") for k, p in enumerate(list(runs_a) + list(runs_b))]
    for p in probs:
        check_probs_range(p)
    eps = [clip_eps(p) for p in list(runs_a) + list(runs_b)]
    ne = np.array([normalized_entropy(y, p, e, w) for p, e in zip(probs, eps)])
    ne_a, ne_b = ne[: len(runs_a)], ne[len(runs_a):]
    if paired:
        d = ne_b / ne_a - 1.0
        estimate, se_runs, df_runs = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), float(d.size - 1)
    else:
        base = ne_a.mean()
        estimate = ne_b.mean() / base - 1.0
        var_a, var_b = ne_a.var(ddof=1) / ne_a.size, ne_b.var(ddof=1) / ne_b.size
        se_runs = math.sqrt(var_a + var_b) / base
        df_runs = _welch_df(var_a, var_b, ne_a.size, ne_b.size)
    se_eval = _eval_se(y, w, probs, eps, len(runs_a), paired, n_boot, seed, max_units)
    se = math.hypot(se_runs, se_eval)
    df = _combined_df(se_runs, df_runs, se_eval)
    half = t_quantile(confidence, df) * se
    return {"estimate": estimate, "ci_lo": estimate - half, "ci_hi": estimate + half, "se": se,
            "se_runs": se_runs, "se_eval": se_eval, "df": df, "df_runs": df_runs, "ne_a": ne_a.tolist(), "ne_b": ne_b.tolist(),
            "paired": paired}


def _combined_df(se_runs: float, df_runs: float, se_eval: float) -> float:
    """Satterthwaite degrees of freedom of se_runs² + se_eval² (the eval part's are effectively infinite)."""
    if se_runs == 0.0:
        return 1e6
    return min(df_runs * (1.0 + (se_eval / se_runs) ** 2) ** 2, 1e6)


def t_quantile(confidence: float, df: float) -> float:
    from scipy import stats as sps  # heavy: scipy.stats takes about a second to import; `import loka.gate` stays fast

    return float(sps.t.ppf(0.5 + confidence / 2, df))


def runs_needed(r: dict, bound: float, confidence: float, max_runs: int = 10_000) -> int | None:
    """Runs a side (pairs, when paired) for ``r``'s interval to exclude ``bound`` at its current spread.

    The between-run variance shrinks as 1/k (t with the matching degrees of freedom);
    the eval-set part does not. None when the eval set alone keeps the interval over the
    bound (more runs cannot decide: evaluate on more examples) or the estimate is on it.
    """
    gap = abs(bound - r["estimate"])
    k_now = len(r["ne_a"])
    if gap == 0.0 or t_quantile(confidence, 1e6) * r["se_eval"] >= gap:
        return None
    var_unit = r["se_runs"] ** 2 * k_now  # between-run variance of one run a side (or one pair)
    df_per_run = r["df_runs"] / max(k_now - 1, 1)
    for k in range(2, max_runs + 1):
        se_runs = math.sqrt(var_unit / k)
        df = _combined_df(se_runs, max(df_per_run * (k - 1), 1.0), r["se_eval"])
        if t_quantile(confidence, df) * math.hypot(se_runs, r["se_eval"]) < gap:
            return k
    return None


def _check_counts(n_a: int, n_b: int, paired: bool = False) -> None:
    if n_a < 2 or n_b < 2:
        raise ReplicateError(
            f"replicate mode needs at least 2 baseline and 2 candidate runs (got {n_a} and {n_b}): train each "
            "side again with another seed or data order, or use the paired gate for a fixed checkpoint"
        )
    if paired and n_a != n_b:
        raise ReplicateError(
            f"paired replicates need one candidate run per baseline run (got {n_a} and {n_b}): give them in "
            "pair order (baseline j and candidate j share data order and initialisation), or drop --paired"
        )


def _welch_df(var_a: float, var_b: float, n_a: int, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of var_a + var_b (each already divided by its n)."""
    num = (var_a + var_b) ** 2
    den = (var_a**2 / (n_a - 1) if var_a else 0.0) + (var_b**2 / (n_b - 1) if var_b else 0.0)
    return num / den if den > 0 else float(n_a + n_b - 2)


def _eval_se(y, w, probs, eps, n_a: int, paired: bool, n_boot: int, seed, max_units: int) -> float:
    """Bootstrap sd of the relative change over resamples of the examples (every run on the same resample)."""
    rng = np.random.default_rng(seed)
    cols = w[:, None] * np.stack([np.ones_like(y), y] + [log_loss(y, p, e) for p, e in zip(probs, eps)], axis=1)
    sums = resampled_sums(group_units(cols, max_units, rng), n_boot, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = sums[:, 1] / sums[:, 0]
        h = -(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate))
        ne = sums[:, 2:] / sums[:, :1] / h[:, None]
        if paired:
            rel = (ne[:, n_a:] / ne[:, :n_a]).mean(1) - 1.0
        else:
            rel = ne[:, n_a:].mean(1) / ne[:, :n_a].mean(1) - 1.0
    rel = rel[np.isfinite(rel)]
    if rel.size < n_boot / 2:
        raise ReplicateError("the eval set is too small: most resamples held a single class")
    return float(rel.std(ddof=1))


def gate_replicates(baselines: list[EvalOutputs], candidates: list[EvalOutputs],
                    budget: GateBudget | None = None, *, paired: bool = False) -> GateResult:
    """Replicate-mode gate on NE per task (see the module docstring); every run scored the same examples.

    ``paired=True``: baseline j and candidate j share data order and initialisation; the
    per-pair differences are gated.
    """
    budget = budget or GateBudget()
    runs = list(baselines) + list(candidates)
    _check_counts(len(baselines), len(candidates), paired)
    ref = runs[0]
    for k, r in enumerate(runs[1:], 1):
        if r.eval_fingerprint != ref.eval_fingerprint:
            raise ReplicateError(f"run {k} scored different examples than run 0; score every run on the same held-out set")
    runs = [ref] + [r.aligned_to(ref.example_ids) for r in runs[1:]]
    n_a = len(baselines)
    checks, notes = [], []
    tasks = budget.tasks or ref.tasks
    unit = " pairs" if paired else " runs a side"
    for k, task in enumerate(tasks):
        seed = None if budget.seed is None else budget.seed + 7919 * k
        r = replicate_ne(ref.labels[task], [x.probs[task] for x in runs[:n_a]], [x.probs[task] for x in runs[n_a:]],
                         paired=paired, weights=ref.weights.get(task), n_boot=budget.n_boot, seed=seed,
                         confidence=budget.confidence)
        verdict, _ = classify_upper(ref.n, r["estimate"], r["ci_lo"], r["ci_hi"], budget.ne_rel)
        needed = runs_needed(r, budget.ne_rel, budget.confidence) if verdict == INCONCLUSIVE else None
        note = "the eval set limits it: evaluate on more examples" if verdict == INCONCLUSIVE and not needed else ""
        checks.append(Check(
            name=f"ne[{task}] {'paired ' if paired else ''}replicates", kind="model",
            baseline=float(np.mean(r["ne_a"])), candidate=float(np.mean(r["ne_b"])), estimate=r["estimate"],
            ci_lo=r["ci_lo"], ci_hi=r["ci_hi"], budget=f"<= +{budget.ne_rel * 100:.4f}%", verdict=verdict,
            n=n_a, n_needed=needed, relative=True, note=note, unit=unit,
        ))  # fmt: skip
        spread = "between-pair" if paired else "between-run"
        notes.append(f"{task}: {spread} se {r['se_runs']:.3%}, eval-set se {r['se_eval']:.3%} "
                     f"({n_a} baseline, {len(runs) - n_a} candidate runs{', paired' if paired else ''}; df {r['df']:.1f})")
    return GateResult(checks=tuple(checks), n_examples=ref.n, confidence=budget.confidence, n_boot=budget.n_boot,
                      baseline=f"{n_a} runs", candidate=f"{len(runs) - n_a} runs",
                      inconclusive_passes=budget.inconclusive_passes, notes=tuple(notes),
                      identical_predictions=paired and all(np.array_equal(a.probs[t], b.probs[t]) for t in tasks
                                                           for a, b in zip(runs[:n_a], runs[n_a:])))


__all__ = ["ReplicateError", "gate_replicates", "replicate_ne", "runs_needed"]
