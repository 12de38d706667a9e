"""FP8 error of a site's GEMMs on real operands, with a confidence interval and a decision.

For each sampled micro-batch and candidate recipe, each GEMM ``out = a · bᵀ`` is
computed twice: in float64 on the captured operands (the hp reference) and in float32
(FP8 tensor cores' accumulation) on the operands after the recipe's emulated cast
(``loka.quantize.fake_quantize``). Scales always see the whole operand; then at most
``max_rows`` random rows of ``a`` and of ``b`` are multiplied, which bounds the cost
while keeping an unbiased sample of output entries.

Every sampled *step* gives one observation per (gemm, recipe): the mean relative
error over that step's micro-batches. Observations give a t-interval on the mean
error, and a sequential decision: ``safe`` once the interval's upper bound is below
the threshold, ``unsafe`` once its lower bound is above it, ``undecided`` otherwise.
A non-finite operand or output makes the observation ``inf`` and the site unsafe.

Two measures of each GEMM's error, ``E = fp8(a · bᵀ) - a · bᵀ`` over its reduction index k:

- ``output``: ``||E|| / ||a · bᵀ||``, the error the GEMM's consumer sees.
- ``scale``: ``||E|| / max(||a · bᵀ||, S)`` with ``S = sqrt(Σ_k ||a[:, k]||² ||b[:, k]||²)``,
  the norm the product would have if its K rank-one terms did not cancel (S <= ||a||·||b||).
  FP8 rounding error scales with S, not with ||a · bᵀ||, so this one is stable across
  steps. For uncorrelated terms ``E||a · bᵀ||² = S²``: both measures agree, and one
  threshold means the same under both. When the terms add up coherently (||a · bᵀ|| > S)
  the product itself is the larger reference and the measure is the output one.

Verdicts use the measure that answers "does this change training" (``MEASURE``):
``output`` for fprop and dgrad, whose outputs are the next layer's input and the gradient
that flows on, so their relative error is what the receiver sees; ``scale`` for wgrad.
dW = dyᵀx sums one term per example and is consumed only by the optimizer; when the
terms cancel (a small gradient from large, disagreeing examples) ``output`` swings by
10x between batches (0.016-0.32 seen on one site) while the error stays a fixed small
share of S. S is also the size of the minibatch gradient's own sampling noise (the
norm of a sum of uncorrelated per-example gradients), which training already absorbs:
an FP8 error well below it changes training less than the choice of batch does. An
error well below the gradient itself does not change the update's direction either,
so the larger of the two references is the one that answers the question.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from loka.quantize import fake_quantize, group_amax, scale_from_amax
from loka.recipe import GemmRecipe, Recipe

SAFE, UNSAFE, UNDECIDED = "safe", "unsafe", "undecided"
MEASURE = {"fprop": "output", "dgrad": "output", "wgrad": "scale"}  # the measure each GEMM's verdict uses


def gemm_operands(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor | None, gemm: str):
    """``(a, b)`` of ``gemm`` in NT form from ``x[M,K]``, ``w[N,K]``, ``dy[M,N]``; None if dy is missing."""
    if gemm == "fprop":
        return x, w
    if dy is None:
        return None
    if gemm == "dgrad":
        return dy, w.t().contiguous()  # dx[M,K] = dy[M,N] · (Wᵀ)[K,N]ᵀ
    return dy.t().contiguous(), x.t().contiguous()  # dW[N,K] = dyᵀ[N,M] · xᵀ[K,M]ᵀ


def _row_subset(n: int, max_rows: int, gen: torch.Generator) -> torch.Tensor | None:
    if n <= max_rows:
        return None
    return torch.randperm(n, generator=gen)[:max_rows].sort().values


def _pad_single_column_block(a: torch.Tensor, b: torch.Tensor, recipe: GemmRecipe):
    """Pad the reduction dim with zeros when a 2-D block spans it whole (K <= block cols).

    A [R/br, 1] block scale is otherwise indistinguishable from a rowwise scale when it is
    broadcast back; zero columns change neither the amax of any block nor the product.
    """
    k = a.shape[1]
    widths = [op.block[1] for op in (recipe.a, recipe.b) if op.granularity in ("blockwise", "mx") and op.block[0] > 1]
    if not widths or k > min(widths):
        return a, b
    pad = min(widths) + 1 - k
    return torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, pad))


def _fake_quantize_rows(t: torch.Tensor, op, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t[rows], fake_quantize(t, op)[rows])``, quantizing only the kept rows when groups allow it.

    Groups of one row (rowwise, 1xN blocks, mx) do not see other rows, and a tensorwise
    scale is computed from the whole tensor first, so only 2-D blocks of several rows
    (128x128 weights) need the whole tensor quantized.
    """
    if rows is None:
        return t, fake_quantize(t, op)
    rows = rows.to(t.device)
    if op.is_hp:
        return t[rows], t[rows]
    if op.granularity == "tensorwise":
        scale = scale_from_amax(group_amax(t, "tensorwise"), op.format, op.pow2)
        return t[rows], fake_quantize(t[rows], op, scale)
    if op.granularity == "rowwise" or op.block[0] == 1:
        return t[rows], fake_quantize(t[rows], op)
    return t[rows], fake_quantize(t, op)[rows]


def gemm_errors(
    a: torch.Tensor, b: torch.Tensor, recipes: list[GemmRecipe], *, max_rows: int = 1024,
    gen: torch.Generator | None = None,
) -> list[tuple[float, float]]:
    """``[(rel_error, sqnr_db)]`` of ``a · bᵀ`` under each recipe's emulated cast vs fp64 on the same operands."""
    return [(rel, sqnr) for rel, sqnr, _ in gemm_errors_both(a, b, recipes, max_rows=max_rows, gen=gen)]


def term_scale(a: torch.Tensor, b: torch.Tensor) -> float:
    """``S = sqrt(Σ_k ||a[:, k]||² ||b[:, k]||²)`` of ``a[M,K] · b[N,K]ᵀ``: its norm without cancellation."""
    return float((a.double().square().sum(0) * b.double().square().sum(0)).sum().sqrt())


def gemm_errors_both(
    a: torch.Tensor, b: torch.Tensor, recipes: list[GemmRecipe], *, max_rows: int = 1024,
    gen: torch.Generator | None = None,
) -> list[tuple[float, float, float]]:
    """``[(rel_error, sqnr_db, scale_error)]``: both measures of the module docstring per recipe.

    The fp64 reference and the kept rows are shared by every recipe. The FP8 product
    multiplies the dequantized operands in float32, the accumulation precision of FP8
    tensor cores (and of the ``emulated`` kernel).
    """
    gen = gen or torch.Generator().manual_seed(0)
    ra, rb = _row_subset(a.shape[0], max_rows, gen), _row_subset(b.shape[0], max_rows, gen)
    a_kept = a if ra is None else a[ra.to(a.device)]
    b_kept = b if rb is None else b[rb.to(b.device)]
    ref = a_kept.double() @ b_kept.double().T
    # ||ref|| once for every recipe; a NaN/Inf anywhere (operand or product) shows as a
    # non-finite norm, so no separate scan of the outputs is needed.
    den = float(torch.linalg.vector_norm(ref))
    scale = term_scale(a_kept, b_kept)
    out = []
    for recipe in recipes:
        a_p, b_p = _pad_single_column_block(a, b, recipe)
        _, a_q = _fake_quantize_rows(a_p, recipe.a, ra)
        _, b_q = _fake_quantize_rows(b_p, recipe.b, rb)
        num = float(torch.linalg.vector_norm((a_q.float() @ b_q.float().T) - ref))  # float32 product, fp64 difference
        reference = max(scale, den) if math.isfinite(den) else den  # the larger of product and term scale
        out.append((*_relative(num, den), _relative(num, reference)[0]))
    return out


def _relative(num: float, den: float) -> tuple[float, float]:
    """``(rel_error, sqnr_db)`` from ``||fp8 - ref||`` and ``||ref||`` (inf when either is not finite)."""
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.inf, -math.inf
    if den == 0:
        return (0.0, math.inf) if num == 0 else (math.inf, -math.inf)
    err = num / den
    return err, (-20.0 * math.log10(err) if err > 0 else math.inf)


def gemm_error(
    a: torch.Tensor, b: torch.Tensor, recipe: GemmRecipe, *, max_rows: int = 1024, gen: torch.Generator | None = None
) -> tuple[float, float]:
    """``(rel_error, sqnr_db)`` of one recipe (see :func:`gemm_errors`)."""
    return gemm_errors(a, b, [recipe], max_rows=max_rows, gen=gen)[0]


def t_interval(values: list[float], confidence: float) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: Student-t interval on the mean; infinite when n < 2 or a value is inf."""
    n = len(values)
    if n == 0:
        return math.nan, -math.inf, math.inf
    if any(not math.isfinite(v) for v in values):
        return math.inf, math.inf, math.inf
    mean = sum(values) / n
    if n < 2:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@functools.lru_cache(maxsize=1024)
def t_quantile(q: float, df: int) -> float:
    """Student-t quantile (cached: a probe asks for the same few (q, df) thousands of times)."""
    from scipy import stats as sps  # heavy: scipy, on first use

    return float(sps.t.ppf(q, df))


def decide(lo: float, hi: float, n: int, threshold: float, min_samples: int) -> str:
    """Sequential decision from an interval (see module docstring)."""
    if math.isinf(lo) and lo > 0:
        return UNSAFE  # non-finite values seen: unsafe at once
    if n < min_samples:
        return UNDECIDED
    if hi < threshold:
        return SAFE
    if lo > threshold:
        return UNSAFE
    return UNDECIDED


def deciding_gemm(gemms: dict[str, dict]) -> str | None:
    """The GEMM a (site, recipe) verdict rests on, from ``{gemm: summary}`` of measured GEMMs.

    Unsafe: the unsafe GEMM whose lower bound is furthest above its threshold. Else undecided:
    the undecided GEMM whose upper bound is furthest up relative to its threshold. Else (safe) the
    GEMM whose upper bound is closest to its threshold. The verdict's reason, the report's table
    and its plots all name this one GEMM.
    """
    measured = {g: s for g, s in gemms.items() if s["n"] > 0}
    for verdict, bound in ((UNSAFE, "ci_lo"), (UNDECIDED, "ci_hi"), (SAFE, "ci_hi")):
        pick = [g for g, s in measured.items() if s["verdict"] == verdict]
        if pick:
            return max(pick, key=lambda g: (measured[g][bound] / measured[g]["threshold"],
                                            measured[g]["mean"] / measured[g]["threshold"]))
    return None


@dataclass
class ErrorTrack:
    """Observations of one (site, recipe, gemm): one relative error and SQNR per sampled step."""

    rel_errors: list[float] = field(default_factory=list)
    sqnrs: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)  # micro-batches behind each observation
    scale_errors: list[float] = field(default_factory=list)  # ||E|| / S per step (module docstring)

    def add(self, step: int, errs: list[tuple[float, ...]]) -> None:
        """One observation from the micro-batches ``errs`` of ``step`` (their mean).

        ``errs``: ``(rel_error, sqnr_db)`` or ``(rel_error, sqnr_db, scale_error)`` per micro-batch.
        """
        if errs:
            scale = [e[2] if len(e) > 2 else math.nan for e in errs]
            self._append(step, sum(e[0] for e in errs) / len(errs), len(errs), sum(scale) / len(scale))

    def _append(self, step: int, rel: float, weight: int, scale: float = math.nan) -> None:
        self.scale_errors.append(scale)
        self.rel_errors.append(rel)
        self.sqnrs.append(-20.0 * math.log10(rel) if 0 < rel < math.inf else (math.inf if rel == 0 else -math.inf))
        self.steps.append(step)
        self.weights.append(weight)

    @classmethod
    def merged(cls, tracks: list["ErrorTrack"]) -> "ErrorTrack":
        """Merge tracks of several ranks: one observation per step, weighted by micro-batches."""
        by_step: dict[int, list[tuple[float, int, float]]] = {}
        for t in tracks:
            scales = t.scale_errors if len(t.scale_errors) == len(t.steps) else [math.nan] * len(t.steps)
            for step, rel, w, sc in zip(t.steps, t.rel_errors, t.weights, scales):
                by_step.setdefault(step, []).append((rel, w, sc))
        out = cls()
        for step in sorted(by_step):
            obs = by_step[step]
            total = sum(w for _, w, _ in obs)
            out._append(step, sum(r * w for r, w, _ in obs) / total, total, sum(sc * w for _, w, sc in obs) / total)
        return out

    def summary(self, threshold: float, confidence: float, min_samples: int, measure: str = "output") -> dict:
        """Interval and verdict of the ``measure`` (``"output"`` or ``"scale"``) the GEMM is judged by.

        ``mean``/``ci_*``/``sqnr_db``/``verdict`` are of that measure; ``output_rel`` and
        ``scale_rel`` hold both intervals. Without scale observations (an old track) the
        output measure is used and ``measure`` says so.
        """
        if measure not in ("output", "scale"):
            raise ValueError(f"measure={measure!r} is not valid; use 'output' or 'scale'")
        # A relative error is >= 0: each interval is cut at 0, which keeps its coverage (the true
        # mean is never below 0) and never shows a negative error to a reader.
        both = {m: _at_least_zero(t_interval(v, confidence))
                for m, v in (("output", self.rel_errors), ("scale", self.scale_errors))}
        if measure == "scale" and (not self.scale_errors or any(math.isnan(v) for v in self.scale_errors)):
            measure = "output"
        mean, lo, hi = both[measure]
        n = len(self.rel_errors)
        sqnr = -20.0 * math.log10(mean) if n and 0 < mean < math.inf else (math.inf if mean == 0 else -math.inf)
        return {
            "mean": mean,
            "ci_lo": lo,
            "ci_hi": hi,
            "sqnr_db": sqnr,
            "n": n,
            "threshold": threshold,
            "verdict": decide(lo, hi, n, threshold, min_samples),
            "measure": measure,
            **{f"{m}_rel": {"mean": v[0], "ci_lo": v[1], "ci_hi": v[2]} for m, v in both.items()},
        }


def _at_least_zero(interval: tuple[float, float, float]) -> tuple[float, float, float]:
    mean, lo, hi = interval
    return mean, max(lo, 0.0), hi


def micro_batch_errors(
    x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor | None, recipes: list[Recipe], max_rows: int,
    gen: torch.Generator,
) -> dict[str, dict[str, tuple[float, float, float]]]:
    """``{recipe name: {gemm: (rel_error, sqnr_db, scale_error)}}`` for every GEMM whose operands were captured."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {r.name: {} for r in recipes}
    for gemm in ("fprop", "dgrad", "wgrad"):
        ops = gemm_operands(x, w, dy, gemm)
        todo = [r for r in recipes if not r.gemm(gemm).is_hp]
        if ops is None or not todo:
            continue
        for r, err in zip(todo, gemm_errors_both(*ops, [r.gemm(gemm) for r in todo], max_rows=max_rows, gen=gen)):
            out[r.name][gemm] = err
    return out
